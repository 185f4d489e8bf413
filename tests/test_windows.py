"""Window planning and overlap-add on their own."""
import numpy as np
import pytest
import torch as th

from serve_graph.engine import OverlapAdd, model_geometry, plan_windows
from serve_graph.engine.windows import center_trim, normalise, window_input


def test_windows_tile_every_pass(tiny_model):
    geometry = model_geometry(tiny_model)
    plan = plan_windows(100000, geometry, shifts=3, overlap=0.25, seed=0)
    assert len(plan.passes) == 3
    for index, pass_ in enumerate(plan.passes):
        covered = th.zeros(pass_.view_length, dtype=th.bool)
        for window in plan.windows_of_pass(index):
            assert window.input_length == geometry.segment_lengths[0]
            covered[window.offset:window.offset + window.length] = True
        assert covered.all()
        assert 0 <= pass_.shift <= plan.max_shift


def test_explicit_offsets_are_used(tiny_model):
    geometry = model_geometry(tiny_model)
    plan = plan_windows(50000, geometry, shifts=2, offsets=[[0, 22050]])
    assert [p.shift for p in plan.passes] == [0, 22050]
    assert plan.passes[0].view_start == -22050 and plan.passes[1].view_start == 0


def test_window_input_zero_pads_outside_the_mix():
    from serve_graph.engine.plan import Window
    mix = th.arange(1., 11.)[None].repeat(2, 1)
    window = Window(0, 0, 0, 0, 4, -3, 8)
    out = window_input(mix, window)
    assert out.tolist()[0] == [0., 0., 0., 1., 2., 3., 4., 5.]
    tail = window_input(mix, Window(0, 0, 0, 0, 4, 7, 6))
    assert tail.tolist()[0] == [8., 9., 10., 0., 0., 0.]


def test_windows_normalised_where_cut_equal_the_normalised_mix_cut(tiny_model):
    """Decode only measures the normalisation; each window normalises its own samples: the
    model sees the very floats the whole-mix normalisation (then cutting) gives it, zero
    padding included. The normalisation is Demucs' to float32's rounding (its sums in
    float64, Demucs' in float32)."""
    geometry = model_geometry(tiny_model)
    th.manual_seed(0)
    mix = th.randn(2, 70000) * 0.3 + 0.01
    normalised, mean, std = normalise(mix)
    ref = mix.mean(0)  # Demucs' own arithmetic (demucs.api.Separator.separate_tensor)
    assert mean == pytest.approx(float(ref.mean()), rel=1e-5, abs=1e-7)
    assert std == pytest.approx(float(ref.std() + 1e-8), rel=1e-6)
    demucs = (mix - ref.mean()) / (ref.std() + 1e-8)
    assert th.allclose(normalised, demucs, rtol=1e-6, atol=1e-6)
    for window in plan_windows(mix.shape[-1], geometry, shifts=2, seed=1).windows:
        assert th.equal(window_input(mix, window, mean, std), window_input(normalised, window))


def test_center_trim_drops_the_odd_sample_on_the_right():
    assert center_trim(th.arange(7.), 4).tolist() == [1., 2., 3., 4.]


def test_overlap_add_of_identity_returns_the_mix(tiny_model):
    """With a model that returns its input, every stem equals the mix, whatever the plan."""
    geometry = model_geometry(tiny_model)
    mix = th.randn(2, 70000)
    plan = plan_windows(mix.shape[-1], geometry, shifts=2, overlap=0.5, seed=3)
    acc = OverlapAdd(plan, geometry)
    for window in reversed(plan.windows):  # any order
        piece = center_trim(window_input(mix, window), window.length)
        acc.add(window, piece[None].repeat(4, 1, 1))
    out = th.from_numpy(acc.result())
    assert th.allclose(out, mix[None].expand(4, -1, -1), atol=1e-5)


def test_bad_plans_are_refused(tiny_model):
    geometry = model_geometry(tiny_model)
    with pytest.raises(ValueError):
        plan_windows(0, geometry)
    with pytest.raises(ValueError):
        plan_windows(100, geometry, overlap=1.0)


@pytest.mark.parametrize("length", [10, 343980, 343981, 352800, 485100])
def test_overlap_add_weights_are_the_references_floats(length):
    """Overlap-add runs in NumPy: its weights are the very float32 values of `apply_model`'s
    triangle and of MSST's `_getWindowingArray` (torch.linspace fades), written here as
    the references write them."""
    from serve_graph.engine.overlap_add import demix_weight, transition_weight
    triangle = th.cat([th.arange(1, length // 2 + 1), th.arange(length - length // 2, 0, -1)])
    assert np.array_equal(transition_weight(length), (triangle / triangle.max()).numpy())
    fade = max(2, length // 10)
    reference = th.ones(length)
    reference[-fade:] = th.linspace(1, 0, fade)
    reference[:fade] = th.linspace(0, 1, fade)
    assert np.array_equal(demix_weight(length, fade, False, False), reference.numpy())
