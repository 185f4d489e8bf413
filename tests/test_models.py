"""Loading through Demucs' own path, and the errors that say where a missing model goes."""
import os
import subprocess
import sys

import pytest
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs

from serve_graph.engine import ModelNotFoundError, load_model, model_geometry
from serve_graph.engine.models import LocalRepo


def test_signature_and_bag_load_from_local_repo(tiny_repo):
    bag = load_model("tinybag", tiny_repo)
    assert isinstance(bag, BagOfModels) and len(bag.models) == 2
    sig = next(iter(LocalRepo(tiny_repo).list_model()))
    single = load_model(sig, tiny_repo)
    assert isinstance(single, HTDemucs)
    geometry = model_geometry(bag)
    assert geometry.sources == ("drums", "bass", "other", "vocals")
    assert geometry.segment_lengths == (44100, 44100) and geometry.is_bag


def test_missing_repo_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        load_model("htdemucs", tmp_path / "absent")


def test_unknown_name_names_the_expected_files(tiny_repo):
    with pytest.raises(ModelNotFoundError, match=r"htdemucs_ft\.yaml"):
        load_model("htdemucs_ft", tiny_repo)


def test_bag_with_missing_checkpoint_says_which_file_and_where(tmp_path):
    (tmp_path / "htdemucs.yaml").write_text("models: ['955717e8']\n")
    with pytest.raises(ModelNotFoundError) as info:
        load_model("htdemucs", tmp_path)
    message = str(info.value)
    assert "955717e8" in message and str(tmp_path) in message
    assert "dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th" in message


def test_pretrained_without_weights_offline_gives_a_clear_cli_error(tmp_path):
    """No internet and an empty cache: the CLI fails fast, naming the file and the folder."""
    song = tmp_path / "song.wav"
    song.write_bytes(b"RIFF")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"))
    env.pop("SERVE_GRAPH_MODEL_REPO", None)
    proc = subprocess.run([sys.executable, "-m", "serve_graph", "separate", str(song),
                           "--model", "htdemucs"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "955717e8-8726e21a.th" in proc.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in proc.stderr
