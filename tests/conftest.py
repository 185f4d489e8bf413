"""Shared fixtures: tiny random HTDemucs models saved in Demucs' checkpoint format."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serve_graph.engine import load_model, make_random_repo  # noqa: E402

BAG_WEIGHTS = [[1., 2., 0.5, 1.], [1., 1., 1., 3.]]
SIX_SOURCES = ["drums", "bass", "other", "vocals", "guitar", "piano"]  # htdemucs_6s' order


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A model repo with bag `htdemucs` (one tiny model), bag `tinybag` (two models) and
    `tiny6s` (six sources, as htdemucs_6s)."""
    repo = tmp_path_factory.mktemp("model_repo")
    make_random_repo(repo, "htdemucs", size="tiny", seed=0)
    make_random_repo(repo, "tiny6s", size="tiny", seed=20, sources=SIX_SOURCES)
    make_random_repo(repo, "tinybag", size="tiny", num_models=2, weights=BAG_WEIGHTS, seed=10)
    return repo


@pytest.fixture(scope="session")
def tiny_model(tiny_repo):
    return load_model("htdemucs", tiny_repo)
