"""The engine reproduces `demucs.api.Separator.separate_tensor` (residual <= -80 dB per stem)."""
import random

import pytest
import torch as th
from demucs.api import Separator

from serve_graph.engine import ModelRunner, load_model, separate

SEED = 1234


def residual_db(ours: th.Tensor, ref: th.Tensor) -> th.Tensor:
    """Per-stem energy of `ours - ref` relative to `ref`, dB: `[S]` from `[S, C, T]`."""
    error = ((ours - ref) ** 2).sum(dim=(-1, -2))
    return 10 * th.log10(error.clamp_min(1e-30) / (ref ** 2).sum(dim=(-1, -2)))


@pytest.fixture(scope="module", params=["htdemucs", "tinybag", "tiny6s"])
def models(request, tiny_repo):
    """(reference Separator, our runner) loaded from the repo through get_model."""
    reference = Separator(request.param, repo=tiny_repo, device="cpu", progress=False)
    return reference, ModelRunner(load_model(request.param, tiny_repo), device="cpu")


@pytest.mark.parametrize("length", [30000, 44100, 150000], ids=["short", "one", "several"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("shifts", [0, 2])
def test_matches_reference(models, length, overlap, shifts):
    reference, runner = models
    mix = th.randn(2, length, generator=th.Generator().manual_seed(length)) * 0.3 + 0.01
    reference.update_parameter(shifts=shifts, overlap=overlap)
    random.seed(SEED)
    _, ref_stems = reference.separate_tensor(mix)
    ref = th.stack(list(ref_stems.values()))
    for batch_size in (1, 3):
        ours = separate(runner, mix, shifts=shifts, overlap=overlap, seed=SEED,
                        batch_size=batch_size)
        assert ours.shape == ref.shape
        assert residual_db(ours, ref).max() <= -80


def test_different_seeds_give_different_shifts(models):
    _, runner = models
    mix = th.randn(2, 60000, generator=th.Generator().manual_seed(0))
    first = separate(runner, mix, shifts=1, seed=1)
    again = separate(runner, mix, shifts=1, seed=1)
    other = separate(runner, mix, shifts=1, seed=2)
    assert th.equal(first, again)
    assert residual_db(other, first).max() > -80
