"""The fused DConv kernels (`serve_graph/engine/fused_dconv.py`) against Demucs' own layers:
on a CUDA GPU the compiled kernels, elsewhere the same kernels in Triton's CPU interpreter
(`TRITON_INTERPRET=1`, set before the module is imported)."""
import copy
import importlib.util
import os

import pytest
import torch as th

# CI installs Triton (the lock's dev extra): there these must run
if not os.environ.get("CI") and importlib.util.find_spec("triton") is None:
    pytest.skip("needs Triton", allow_module_level=True)

DEVICE = "cuda" if th.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def fused():
    """The kernels' module; without a GPU in Triton's interpreter (set in conftest.py)."""
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    from serve_graph.engine import fused_dconv
    return fused_dconv


@pytest.fixture
def gpu_tiles(fused, monkeypatch):
    """The GPU's 64-step time tiles, also under the interpreter (its default is longer)."""
    monkeypatch.setattr(fused, "BLOCK_T", 64)


def residual_db(out: th.Tensor, reference: th.Tensor) -> float:
    return float(10 * th.log10(((out.float() - reference) ** 2).sum() / (reference ** 2).sum()))


def dconv(channels: int, seed: int):
    """Demucs' DConv (htdemucs' settings: compress 8, depth 2) with every parameter random,
    LayerScale and GroupNorm's affine included (their defaults would hide mistakes)."""
    from demucs.demucs import DConv
    th.manual_seed(seed)
    layer = DConv(channels, compress=8, depth=2, init=1e-4).eval()
    with th.no_grad():
        for parameter in layer.parameters():
            if parameter.dim() == 1:
                parameter.normal_(0., 0.3)
    return layer.to(DEVICE)


# hidden channels 6 and 12 (padded to 16 for the tile products), lengths cut by the tiles
@pytest.mark.parametrize("channels,length", [(48, 200), (96, 64), (48, 3)])
def test_each_layer_equals_demucs_in_fp32(fused, gpu_tiles, channels, length):
    module = dconv(channels, seed=channels + length)
    x = th.randn(3, channels, length, device=DEVICE)
    with th.no_grad():
        for layer in module.layers:
            out = fused.FusedDConvLayer(layer)(x)
            assert out.dtype == th.float32 and out.shape == x.shape
            assert residual_db(out, layer(x)) <= -100


@pytest.mark.parametrize("half_norm", [False, True])
def test_fp16_is_as_close_to_fp32_as_demucs_own_fp16(fused, gpu_tiles, half_norm):
    """Under fp16 autocast the fused tail is within 1 dB of the eager layers' own residual
    against fp32 (measured: better, -70 to -76 dB against -66 to -68), with half GroupNorm
    (`HalfGroupNorm`: fp16 out) and without (fp32 out, as autocast's GroupNorm gives)."""
    from serve_graph.engine.forward import use_half_group_norm
    module = dconv(48, seed=1)
    half = copy.deepcopy(module)
    if half_norm:
        use_half_group_norm(half)
    x = th.randn(2, 48, 130, device=DEVICE)
    with th.no_grad():
        for exact_layer, layer in zip(module.layers, half.layers):
            exact = exact_layer(x)
            with th.autocast(DEVICE, dtype=th.float16):
                eager, out = layer(x), fused.FusedDConvLayer(layer)(x)
            assert out.dtype == (th.float16 if half_norm else th.float32)
            assert residual_db(out, exact) <= min(residual_db(eager, exact) + 1, -60)


@pytest.mark.parametrize("compile_mode", [
    "none", pytest.param("graphs", marks=pytest.mark.skipif(DEVICE == "cpu",
                                                             reason="CUDA graphs need a GPU"))])
def test_a_runner_with_fused_dconv_gives_the_plain_runners_stems(fused, tiny_model,
                                                               compile_mode):
    """The tiny htdemucs through `ModelRunner` with `dconv="triton"`: every DConv layer
    fused, the same stems as Demucs' layers (fp32); on a GPU also captured in CUDA graphs."""
    from demucs.demucs import DConv

    from serve_graph.engine.separator import ModelRunner, RunnerOptions
    plain = ModelRunner(copy.deepcopy(tiny_model), options=RunnerOptions(DEVICE))
    runner = ModelRunner(copy.deepcopy(tiny_model), options=RunnerOptions(
        DEVICE, compile=compile_mode, dconv="triton"))
    layers = sum(len(m.layers) for m in runner.models[0].modules() if isinstance(m, DConv))
    assert layers > 0 and layers == sum(isinstance(m, fused.FusedDConvLayer)
                                        for m in runner.models[0].modules())
    length = plain.geometry.input_length(0, plain.geometry.segment_lengths[0])
    windows = th.randn(1, 2, length, generator=th.Generator().manual_seed(3)) * 0.3
    assert residual_db(runner(0, windows), plain(0, windows)) <= -100


def test_the_options_refuse_what_cannot_run(fused, tiny_model, monkeypatch):
    from serve_graph.engine.separator import ModelRunner, RunnerOptions
    with pytest.raises(ValueError, match="Inductor fuses the DConv layers itself"):
        RunnerOptions(DEVICE, compile="compile", dconv="triton")
    with pytest.raises(ValueError, match="dconv must be one of"):
        RunnerOptions(DEVICE, dconv="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ModelRunner(copy.deepcopy(tiny_model), options=RunnerOptions("cpu", dconv="triton"))
