"""Shared fixtures: tiny random HTDemucs models saved in Demucs' checkpoint format."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (tests/test_fused_dconv.py) run in Triton's CPU interpreter.
# Triton reads this when it is imported, and torch._dynamo imports it: so here, before any
# test. It changes nothing else (no other code here runs Triton kernels on the CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from serve_graph.engine import load_model, make_random_repo, roformer_files  # noqa: E402

BAG_WEIGHTS = [[1., 2., 0.5, 1.], [1., 1., 1., 3.]]
SIX_SOURCES = ["drums", "bass", "other", "vocals", "guitar", "piano"]  # htdemucs_6s' order


SPECIALISTS = [[1., 0., 0., 0.], [0., 1., 0., 0.], [0., 0., 1., 0.], [0., 0., 0., 1.]]
MDX_WEIGHTS = [[1., 1., 2., 0.], [1., 0., 1., 1.]]  # a zero: stem subsets can skip a model


def make_tiny_repo(repo: Path) -> Path:
    """Tiny random models in the shapes of those Demucs ships: `htdemucs`, `tinybag` (two
    HTDemucs, per-stem weights), `tiny6s` (six sources, as htdemucs_6s), `tinyft` (one
    specialist per stem, as htdemucs_ft), `tinymmi` (HDemucs, segment set by its bag file, as
    hdemucs_mmi), `tinymdx` (a Demucs v2 and an HDemucs, as the mdx bags) and
    `tinyroformer` (viperx's BS-RoFormer vocals config, narrow and shallow, 1 s windows:
    MSST's `.yaml` + `.ckpt`)."""
    make_random_repo(repo, "htdemucs", size="tiny", seed=0)
    make_random_repo(repo, "tiny6s", size="tiny", seed=20, sources=SIX_SOURCES)
    make_random_repo(repo, "tinybag", size="tiny", num_models=2, weights=BAG_WEIGHTS, seed=10)
    make_random_repo(repo, "tinyft", size="tiny", num_models=4, weights=SPECIALISTS, seed=30)
    make_random_repo(repo, "tinymmi", size="tiny", arch="hdemucs", seed=40, segment=2)
    make_random_repo(repo, "tinymdx", size="tiny", num_models=2, arch=["demucs", "hdemucs"],
                     weights=MDX_WEIGHTS, seed=50, segment=3)
    roformer_files.make_random(repo, "tinyroformer", tiny_roformer_config(), seed=60)
    return repo


def tiny_roformer_config() -> dict:
    raw = roformer_files.scaled("bs_roformer", dim=16, depth=1, heads=2, dim_head=8)
    raw["audio"] = {**raw["audio"], "chunk_size": 44100}
    return raw


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    return make_tiny_repo(tmp_path_factory.mktemp("model_repo"))


@pytest.fixture(scope="session")
def tiny_model(tiny_repo):
    return load_model("htdemucs", tiny_repo)
