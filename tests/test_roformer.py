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
from bs_roformer import BSRoformer, MelBandRoformer

from serve_graph.engine import roformer_files
from serve_graph.engine.errors import ModelNotFoundError
from serve_graph.engine.roformer import Roformer, mel_band_support
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
