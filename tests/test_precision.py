"""Precision options of ModelRunner, their logic checked on the CPU with the tiny model."""
import copy

import pytest
import torch as th

from serve_graph.engine import ModelRunner, separate
from serve_graph.engine.forward import HalfGroupNorm, Spectral
from serve_graph.engine.separator import RunnerOptions
from test_parity import residual_db

MIX = th.randn(2, 60000, generator=th.Generator().manual_seed(3)) * 0.3


def stems(model, precision):
    return separate(ModelRunner(copy.deepcopy(model), "cpu", precision), MIX, shifts=1, seed=0)


def test_unknown_precision_is_refused(tiny_model):
    with pytest.raises(ValueError, match="precision"):
        ModelRunner(tiny_model, "cpu", "int4")


def test_tf32_is_plain_fp32_on_cpu(tiny_model):
    assert th.equal(stems(tiny_model, "tf32"), stems(tiny_model, "fp32"))


def test_fp32_on_cpu_routes_self_attention_through_sdpa(tiny_model):
    th.backends.mha.set_fastpath_enabled(True)
    ModelRunner(copy.deepcopy(tiny_model), "cpu", "fp32")
    assert not th.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_keeps_spectral_transforms_in_fp32(tiny_model, monkeypatch, precision):
    seen = []
    for name in ("spec", "ispec"):
        original = getattr(Spectral, name)

        def spy(self, x, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, x.dtype, th.is_autocast_enabled("cpu")))
            return _original(self, x, *args, **kwargs)
        monkeypatch.setattr(Spectral, name, spy)
    low = stems(tiny_model, precision)
    assert {name for name, _, _ in seen} == {"spec", "ispec"}
    assert all(dtype in (th.float32, th.complex64) and not autocast
               for _, dtype, autocast in seen), seen
    assert low.dtype == th.float32 and th.isfinite(low).all()
    residual = residual_db(low, stems(tiny_model, "fp32")).max()
    assert -80 < residual < -15  # lower precision, but the same separation


def runner_with(model, precision, group_norm):
    return ModelRunner(copy.deepcopy(model), options=RunnerOptions(
        "cpu", precision, group_norm=group_norm))


def test_half_group_norm_is_bit_identical_in_fp32(tiny_model):
    half = runner_with(tiny_model, "fp32", "half")
    assert sum(isinstance(m, HalfGroupNorm) for m in half.models[0].modules()) > 0
    assert th.equal(separate(half, MIX, seed=0), stems(tiny_model, "fp32"))


def test_half_group_norm_keeps_bf16_activations_and_its_residual_is_small(tiny_model):
    """Under bf16 autocast a GroupNorm hands bf16 on (autocast's own upcasts to fp32); the
    stems stay within bf16's error of fp32 (the figure on the GPU is the GPU run's)."""
    seen = []
    runner = runner_with(tiny_model, "bf16", "half")
    for module in runner.models[0].modules():
        if isinstance(module, HalfGroupNorm):
            module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    mix = MIX[:, :44100]
    reference = separate(ModelRunner(copy.deepcopy(tiny_model), "cpu"), mix, seed=0)
    half = separate(runner, mix, seed=0)
    assert seen and set(seen) == {th.bfloat16}
    assert residual_db(half, reference).max() < -20
    with pytest.raises(ValueError, match="group_norm"):
        RunnerOptions("cpu", group_norm="fp8")


def overflowing(model):
    """`model` with its first encoder's convolution 10^5 times louder: its activations pass
    fp16's largest value (65504), fp32's do not."""
    loud = copy.deepcopy(model)
    with th.no_grad():
        loud.models[0].encoder[0].conv.weight.mul_(1e5)
    return loud


def windows_of(runner, count):
    length = runner.geometry.input_length(0, runner.geometry.segment_lengths[0])
    return th.randn(count, 2, length, generator=th.Generator().manual_seed(5)) * 0.3


def test_the_windows_that_overflow_fp16_are_run_again_in_fp32(tiny_model):
    """Two windows of noise overflow; one of silence does not and keeps its fp16 stems: only
    the two are run again, and their fp32 stems land in their places."""
    fp16 = ModelRunner(overflowing(tiny_model), "cpu", "fp16")
    windows = windows_of(fp16, 3)
    windows[1] = 0
    with th.autocast("cpu", dtype=th.float16), th.inference_mode():  # the premise
        finite = [bool(th.isfinite(fp16.models[0](w[None])).all()) for w in windows]
    assert finite == [False, True, False]
    out = fp16(0, windows)
    assert fp16.fp32_redone_windows == 2 and fp16.take_fp32_redone() == 2
    assert fp16.fp32_redone_windows == 0
    exact = ModelRunner(overflowing(tiny_model), "cpu", "fp32")(0, windows)
    assert th.isfinite(out).all()
    assert residual_db(out[[0, 2]], exact[[0, 2]]).max() < -120
    assert not out[1].any()  # silence's own fp16 stems (HTDemucs scales them by its std, 0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finite_half_precision_windows_are_not_run_again(tiny_model, precision):
    runner = ModelRunner(copy.deepcopy(tiny_model), "cpu", precision)
    assert th.isfinite(runner(0, windows_of(runner, 2))).all()
    assert runner.fp32_redone_windows == 0
