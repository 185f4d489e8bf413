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
