"""The engine reproduces `demucs.api.Separator.separate_tensor` (residual <= -80 dB per stem)."""
import itertools
import random

import pytest
import torch as th
from demucs.api import Separator

from serve_graph.engine import ModelRunner, load_model, plan_windows, separate

SEED = 1234


def residual_db(ours: th.Tensor, ref: th.Tensor) -> th.Tensor:
    """Per-stem energy of `ours - ref` relative to `ref`, dB: `[S]` from `[S, C, T]`."""
    error = ((ours - ref) ** 2).sum(dim=(-1, -2))
    return 10 * th.log10(error.clamp_min(1e-30) / (ref ** 2).sum(dim=(-1, -2)))


MODELS = ["htdemucs", "tinybag", "tiny6s", "tinymmi", "tinymdx"]
SHORT, ONE, SEVERAL = 30000, 44100, 150000  # samples: under one window, one, several
# (shifts, overlap, length) per model: a covering design instead of all 12 for each of the 5
# (60 cases, ~70 s). Every model meets both shifts, both overlaps and the three lengths, and
# every one of the 12 combinations is run on at least one model (bags and HDemucs included).
CASES = {"htdemucs": [(0, .25, SHORT), (2, .5, ONE), (0, .5, SEVERAL), (2, .25, SEVERAL)],
         "tinybag": [(2, .25, SHORT), (0, .5, ONE), (2, .5, SEVERAL), (0, .25, SEVERAL)],
         "tiny6s": [(0, .5, SHORT), (2, .25, ONE), (0, .25, ONE), (2, .25, SEVERAL)],
         "tinymmi": [(2, .5, SHORT), (0, .5, ONE), (0, .25, SEVERAL), (2, .25, ONE)],
         "tinymdx": [(2, .25, SHORT), (2, .5, ONE), (0, .5, SEVERAL), (0, .25, SEVERAL)]}


def loaded(name: str, repo) -> tuple:
    """(reference Separator, our runner) loaded from the repo through get_model."""
    reference = Separator(name, repo=repo, device="cpu", progress=False)
    return reference, ModelRunner(load_model(name, repo), device="cpu")


@pytest.fixture(scope="module")
def models_by_name(tiny_repo) -> dict:
    return {name: loaded(name, tiny_repo) for name in MODELS}


@pytest.fixture(scope="module", params=MODELS)
def models(request, models_by_name):
    return models_by_name[request.param]


def test_the_cases_cover_every_combination_and_every_model_every_level():
    combinations = {case for cases in CASES.values() for case in cases}
    assert combinations == set(itertools.product([0, 2], [.25, .5], [SHORT, ONE, SEVERAL]))
    for name, cases in CASES.items():
        assert [set(levels) for levels in zip(*cases)] == [
            {0, 2}, {.25, .5}, {SHORT, ONE, SEVERAL}], name


@pytest.mark.parametrize("name, shifts, overlap, length",
                         [(name, *case) for name in MODELS for case in CASES[name]])
def test_matches_reference(models_by_name, name, shifts, overlap, length):
    reference, runner = models_by_name[name]
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


@pytest.mark.parametrize("name", ["tinyft", "tinymdx"])
def test_stem_subsets_run_only_the_models_they_need(tiny_repo, name):
    """For every subset of stems, a plan with only the bag's models that weigh on them gives
    those stems as the whole bag does, with fewer windows."""
    reference = Separator(name, repo=tiny_repo, device="cpu", progress=False, shifts=1)
    runner = ModelRunner(load_model(name, tiny_repo), device="cpu")
    geometry = runner.geometry
    mix = th.randn(2, 100000, generator=th.Generator().manual_seed(7)) * 0.3
    random.seed(SEED)
    _, ref_stems = reference.separate_tensor(mix)
    whole = plan_windows(mix.shape[-1], geometry, shifts=1, seed=SEED)
    pruned_somewhere = False
    for size in range(1, len(geometry.sources) + 1):
        for stems in itertools.combinations(geometry.sources, size):
            models = geometry.models_for(stems)
            plan = plan_windows(mix.shape[-1], geometry, shifts=1, seed=SEED, models=models)
            assert len(plan.windows) == sum(
                1 for w in whole.windows if w.model_index in models)
            pruned_somewhere |= len(plan.windows) < len(whole.windows)
            ours = separate(runner, mix, plan=plan)
            for stem in stems:
                index = geometry.sources.index(stem)
                ref = ref_stems[stem][None]
                assert residual_db(ours[index][None], ref).max() <= -80, (stems, stem)
    assert pruned_somewhere
    assert len(geometry.models_for(["vocals"])) == 1  # one of the bag's models
