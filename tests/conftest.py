"""Shared fixtures: tiny random HTDemucs models saved in Demucs' checkpoint format."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serve_graph.engine import load_model, make_random_repo  # noqa: E402

BAG_WEIGHTS = [[1., 2., 0.5, 1.], [1., 1., 1., 3.]]


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A model repo with bag `htdemucs` (one tiny model) and bag `tinybag` (two models)."""
    repo = tmp_path_factory.mktemp("model_repo")
    make_random_repo(repo, "htdemucs", size="tiny", seed=0)
    make_random_repo(repo, "tinybag", size="tiny", num_models=2, weights=BAG_WEIGHTS, seed=10)
    return repo


@pytest.fixture(scope="session")
def tiny_model(tiny_repo):
    return load_model("htdemucs", tiny_repo)
