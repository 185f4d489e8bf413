"""The RoFormer architectures against their published reference, on random weights of the
real configs (viperx BS-RoFormer ep_317, Kim's Mel-Band RoFormer vocals) at reduced width and
depth: PyPI `bs-roformer` (lucidrains' code, which MSST's descends from) with MSST's state-dict
names mapped onto it and its extra features switched off (one residual stream, no value
residuals, no linear-attention slot, `zero_dc` on) computes what MSST's code does. Also the
checkpoint files: strict loading, `weights_only`, errors that name the file."""
import math
import re

import librosa
import numpy as np
import pytest
import torch as th
import torch.nn.functional as F
from bs_roformer import BSRoformer, MelBandRoformer
from torch.utils.flop_counter import FlopCounterMode

from serve_graph.engine import roformer_files
from serve_graph.engine.errors import (InvalidParameterError, ModelNotFoundError,
                                      OverBudgetError)
from serve_graph.engine.models import load_model, model_geometry
from serve_graph.engine.options import SeparationOptions
from serve_graph.engine.pipeline import plan_song
from serve_graph.engine.plan import plan_windows
from serve_graph.engine.separator import ModelRunner, separate
from serve_graph.engine.roformer import Roformer, RoformerSeparator, mel_band_support
from serve_graph.engine.roformer_config import read_config

REDUCED = dict(dim=32, depth=2, heads=2, dim_head=16)  # the published configs, narrower


def residual_db(ours: th.Tensor, reference: th.Tensor) -> float:
    """10 log10(||ours - reference||^2 / ||reference||^2)."""
    error = (ours.double() - reference.double()).pow(2).sum()
    return 10 * math.log10(max(float(error), 1e-300) / float(reference.double().pow(2).sum()))


@pytest.mark.parametrize("bands,n_fft", [(60, 2048), (40, 2048), (8, 2048), (128, 4096)])
def test_mel_bands_are_the_supports_of_librosas_filters(bands, n_fft):
    filters = librosa.filters.mel(sr=44100, n_fft=n_fft, n_mels=bands)
    filters[0, 0] = filters[-1, -1] = 1.  # MSST forces the first and last bin in
    assert (mel_band_support(bands, n_fft, 44100) == (filters > 0)).all()


def config(tmp_path, family, **model):
    raw = roformer_files.scaled(family, **{**REDUCED, **model})
    if raw["model"]["num_stems"] > 1:
        raw["training"] = {"instruments": ["vocals", "other"]}
    return read_config(roformer_files.write_config(tmp_path / f"{family}.yaml", raw))


def reference_model(ours: Roformer):
    """lucidrains' model of our config, holding our weights under its names."""
    arch, mel = ours.config.architecture, ours.mel
    common = dict(dim=ours.config.dim, depth=arch["depth"], stereo=arch["stereo"],
                  num_stems=arch["num_stems"],
                  time_transformer_depth=arch["time_transformer_depth"],
                  freq_transformer_depth=arch["freq_transformer_depth"],
                  dim_head=arch["dim_head"], heads=arch["heads"],
                  stft_n_fft=arch["stft_n_fft"], stft_hop_length=arch["stft_hop_length"],
                  stft_win_length=arch["stft_win_length"], zero_dc=arch["zero_dc"],
                  mask_estimator_depth=arch["mask_estimator_depth"], num_residual_streams=1,
                  attn_dropout=0., ff_dropout=0.)
    if mel:
        reference = MelBandRoformer(**common, num_bands=arch["num_bands"],
                                    linear_transformer_depth=0, add_value_residual=False)
    else:
        reference = BSRoformer(**common, freqs_per_bands=arch["freqs_per_bands"])
    state = {}
    for key, value in ours.state_dict().items():
        found = re.match(r"layers\.(\d+)\.(\d+)\.(layers\.\d+\.\d+\.)?(.*)", key)
        if found:  # their blocks wrap each sub-layer as `.branch`; Mel's slot 0 is empty
            block, slot, sub, rest = found.groups()
            key = (f"layers.{block}.{int(slot) + mel}." +
                   (f"{sub}branch.{rest}" if sub else rest))
        state[key] = value
    for key, value in reference.state_dict().items():
        if "to_value_residual_mix" in key:  # BS's value residuals: mixed with weight 0
            state[key] = th.full_like(value, -1e4 if key.endswith("bias") else 0.)
    reference.load_state_dict(state, strict=True)
    return reference.eval()


@pytest.mark.parametrize("family,extra", [
    ("bs_roformer", {}), ("mel_band_roformer", {}),
    ("bs_roformer", {"num_stems": 2}), ("mel_band_roformer", {"mask_estimator_depth": 1}),
])
def test_the_forward_is_the_references(tmp_path, family, extra):
    ours = roformer_files.random_model(config(tmp_path, family, **extra), seed=1)
    reference = reference_model(ours)
    windows = th.randn(2, 2, 44100, generator=th.Generator().manual_seed(0))  # 1 s
    with th.inference_mode():
        got, expected = ours(windows), reference(windows)
    if expected.dim() == 3:  # theirs drops the stem axis of a one-stem model
        expected = expected[:, None]
    assert got.shape == expected.shape == (2, ours.config.architecture["num_stems"], 2, 44100)
    assert residual_db(got, expected) <= -100


def test_a_checkpoint_loads_strictly_from_the_model_repo(tmp_path):
    raw = roformer_files.scaled("mel_band_roformer", **REDUCED)
    saved = roformer_files.make_random(tmp_path, "kim_vocals", raw, seed=3)
    assert roformer_files.is_roformer("kim_vocals", tmp_path)
    assert not roformer_files.is_roformer("htdemucs", tmp_path)
    loaded = roformer_files.load("kim_vocals", tmp_path)
    windows = th.randn(1, 2, 44100)
    with th.inference_mode():
        assert th.equal(loaded(windows), saved(windows))
    # MSST's trainer and others wrap the state dict: found under their keys
    th.save({"state_dict": saved.state_dict(), "epoch": 3}, tmp_path / "kim_vocals.ckpt")
    assert th.equal(roformer_files.load("kim_vocals", tmp_path).band_split.to_features[0][1]
                    .weight, saved.band_split.to_features[0][1].weight)


def test_checkpoint_problems_name_the_file(tmp_path):
    raw = roformer_files.scaled("bs_roformer", **REDUCED)
    saved = roformer_files.make_random(tmp_path, "viperx", raw)
    (tmp_path / "viperx.yaml").rename(tmp_path / "other.yaml")
    with pytest.raises(ModelNotFoundError, match=re.escape(str(tmp_path / "viperx.yaml"))):
        roformer_files.load("viperx", tmp_path)
    (tmp_path / "other.yaml").rename(tmp_path / "viperx.yaml")
    state = saved.state_dict()
    state.pop("final_norm.gamma")
    state["extra.weight"] = th.zeros(1)
    th.save(state, tmp_path / "viperx.ckpt")
    with pytest.raises(ModelNotFoundError, match=r"does not fit .*missing final_norm.gamma, "
                                                 r"unexpected extra.weight"):
        roformer_files.load("viperx", tmp_path)
    # a pickle that would run code is not loaded (weights_only=True)
    th.save({"state_dict": saved.state_dict(), "hook": print}, tmp_path / "viperx.ckpt")
    with pytest.raises(ModelNotFoundError, match="weights_only=True"):
        roformer_files.load("viperx", tmp_path)


def msst_demix(model: Roformer, mix: th.Tensor, chunk: int, num_overlap: int) -> th.Tensor:
    """MSST's `demix` (utils/model_utils.py, generic mode) at batch size 1, written from its
    published algorithm: `mix [C, T]` -> the model's stems `[N, C, T]`."""
    fade, step = chunk // 10, chunk // num_overlap
    border, length = chunk - step, mix.shape[-1]
    padded = length > 2 * border and border > 0
    if padded:
        mix = F.pad(mix[None], (border, border), mode="reflect")[0]
    window = th.ones(chunk)
    window[-fade:], window[:fade] = th.linspace(1, 0, fade), th.linspace(0, 1, fade)
    result = th.zeros(model.config.architecture["num_stems"], *mix.shape)
    counter = th.zeros_like(result)
    i = 0
    while i < mix.shape[1]:
        part = mix[:, i:i + chunk]
        inside = part.shape[-1]
        mode = "reflect" if inside > chunk // 2 else "constant"
        part = F.pad(part[None], (0, chunk - inside), mode=mode)[0]
        start = i
        i += step
        weights = window.clone()
        if i - step == 0:
            weights[:fade] = 1
        elif i >= mix.shape[1]:
            weights[-fade:] = 1
        with th.inference_mode():
            out = model(part[None])[0]
        result[..., start:start + inside] += out[..., :inside] * weights[:inside]
        counter[..., start:start + inside] += weights[:inside]
    estimate = th.nan_to_num(result / counter, nan=0.)
    return estimate[..., border:-border] if padded else estimate


@pytest.mark.parametrize("family", ["bs_roformer", "mel_band_roformer"])
@pytest.mark.parametrize("seconds,num_overlap", [(0.3, 2), (0.8, 2), (3.3, 2), (2.45, 4)])
def test_a_song_is_msst_demix_at_batch_size_one(tmp_path, family, seconds, num_overlap):
    """Songs shorter than half a window (zeros after it), shorter than the borders (no
    reflection of the mix), and longer (reflected, trimmed); windows of 1 s here, batched
    4 at a time by the engine while the reference runs one by one."""
    raw = roformer_files.scaled(family, **REDUCED)
    raw["audio"] = {**raw["audio"], "chunk_size": 44100}
    raw["inference"] = {"num_overlap": num_overlap}
    roformer_files.make_random(tmp_path, "model", raw, seed=2)
    model = load_model("model", tmp_path)
    mix = th.randn(2, int(seconds * 44100), generator=th.Generator().manual_seed(5)) * 0.3
    reference = msst_demix(model.roformer, mix, 44100, num_overlap)
    runner = ModelRunner(model, "cpu")
    assert runner.geometry.sources == ("vocals", "instrumental")
    stems = separate(runner, mix, shifts=1, batch_size=4)
    assert stems.shape == (2, *mix.shape)
    assert residual_db(stems[0], reference[0]) <= -80
    assert residual_db(stems[1], mix - reference[0]) <= -80


def test_overlap_maps_to_num_overlap_and_shifts_are_refused(tmp_path):
    raw = roformer_files.scaled("bs_roformer", **REDUCED)
    roformer_files.make_random(tmp_path, "model", raw)
    geometry = model_geometry(load_model("model", tmp_path))
    assert geometry.family == "roformer" and geometry.num_overlap == 2
    chunk = 352800
    for overlap, step in [(None, chunk // 2), (0.75, chunk // 4), (0.25, chunk)]:
        plan = plan_windows(10 * chunk, geometry, overlap=overlap)
        assert plan.windows[1].offset - plan.windows[0].offset == step
    options = SeparationOptions(shifts=2)
    with pytest.raises(InvalidParameterError, match="a RoFormer model takes shifts 0 or 1"):
        plan_song(th.zeros(2, 44100), geometry, options)
    with pytest.raises(InvalidParameterError, match="takes shifts 0 or 1"):  # the library's
        separate(ModelRunner(load_model("model", tmp_path)), th.zeros(2, 44100), shifts=2)


@pytest.mark.parametrize("family", ["bs_roformer", "mel_band_roformer"])
def test_window_gflop_is_what_torch_counts(tmp_path, family):
    """The shapes-only count (the budget's cost) equals torch's flop counter on a forward
    (meta tensors: no arithmetic), with deeper transformers and mask estimators."""
    with th.device("meta"):
        model = Roformer(config(tmp_path, family, time_transformer_depth=2,
                                mask_estimator_depth=3))
    model.to("meta")
    for length in (model.config.chunk_size, 44100):
        counter = FlopCounterMode(display=False)
        with counter, th.inference_mode():
            model(th.zeros(1, 2, length, device="meta"))
        assert model.window_gflop(length) == pytest.approx(counter.get_total_flops() / 1e9,
                                                           rel=1e-9)


def test_the_budget_counts_a_roformer_window_by_its_cost(tmp_path):
    """viperx's BS-RoFormer at full size: a window costs ~39 of htdemucs' (8.7 TFLOP), so the
    budget of 600 htdemucs windows takes a 30 s song, not a 60 s one."""
    path = roformer_files.write_config(tmp_path / "viperx.yaml",
                                       roformer_files.TEMPLATES["bs_roformer"])
    with th.device("meta"):
        model = RoformerSeparator(Roformer(read_config(path)))
    model.to("meta")
    geometry = model_geometry(model)
    assert geometry.window_cost == pytest.approx(8696.18 / 224.47, rel=1e-4)
    options = SeparationOptions()
    assert len(plan_song(th.zeros(2, 30 * 44100), geometry, options, 600).plan.windows) == 10
    with pytest.raises(OverBudgetError, match=r"17 windows of a model that costs 38.7 "
                                              r"htdemucs windows each, 659 in all"):
        plan_song(th.zeros(2, 60 * 44100), geometry, options, 600)
