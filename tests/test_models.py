"""Loading through Demucs' own path, and the errors that say where a missing model goes."""
import os
import subprocess
import sys
import typing as tp

import pytest
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs

from serve_graph.engine import ModelNotFoundError, load_model, model_geometry
from demucs.repo import LocalRepo


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


def test_model_files_follow_demucs_and_torch_rules(tiny_repo, tmp_path, monkeypatch):
    """The file rules written again in `model_files` (no torch) equal Demucs' and torch's own."""
    import torch
    from demucs.hf import hf_repo_name as demucs_hf_repo_name
    from demucs.pretrained import REMOTE_ROOT, _parse_remote_files
    from serve_graph.engine import model_files
    assert model_files.remote_root() == REMOTE_ROOT
    assert model_files.remote_files() == _parse_remote_files(REMOTE_ROOT / "files.txt")
    (tmp_path / "plain.th").write_bytes(b"")  # a checkpoint named without a checksum
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for repo in (tiny_repo, tmp_path):
        assert model_files.local_checkpoints(repo) == LocalRepo(repo).list_model()
    for name in ("htdemucs", "htdemucs_ft", "htdemucs_6s", "mdx_extra", "hdemucs_mmi"):
        assert model_files.hf_repo_name(name) == demucs_hf_repo_name(name)
    for env in ({}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")},
                {"TORCH_HOME": str(tmp_path / "th"), "XDG_CACHE_HOME": str(tmp_path / "x")}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert model_files.hub_dir() == torch.hub.get_dir()


def test_weights_problem_names_the_file_load_model_wants(tiny_repo, tmp_path):
    from serve_graph.engine.model_files import weights_problem
    assert weights_problem("tinybag", tiny_repo) is None
    (tmp_path / "htdemucs.yaml").write_text("models: ['955717e8']\n")
    with pytest.raises(ModelNotFoundError) as info:
        load_model("htdemucs", tmp_path)
    assert weights_problem("htdemucs", tmp_path) == str(info.value)


LIGHT_MODULES = ("serve_graph.__main__", "serve_graph.app", "serve_graph.ingress",
                 "serve_graph.decode", "serve_graph.encode", "serve_graph.separate",
                 "serve_graph.preflight", "serve_graph.engine.model_files",
                 "serve_graph.engine.plan")


HEAVY = ("torch", "demucs.apply", "torch._dynamo")


def heavy_modules_loaded(imports: tp.Dict[str, str]) -> tp.Dict[str, tp.List[str]]:
    """`{label: the HEAVY modules loaded}` after importing `imports[label]` (comma-separated
    modules) in a fresh interpreter of its own; all at once."""
    code = ("import sys, importlib; [importlib.import_module(m) for m in sys.argv[1].split(',')]; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    checks = {label: subprocess.Popen([sys.executable, "-c", code, modules],
                                      stdout=subprocess.PIPE, text=True)
              for label, modules in imports.items()}
    found = {}
    for label, check in checks.items():
        output = check.communicate(timeout=120)[0].strip()
        assert check.returncode == 0, label
        found[label] = output.split(",") if output else []
    return found


def test_start_up_paths_do_not_import_torch():
    """The launcher, Serve's build task (every deployment module), the Ingress replica and the
    model check import neither torch nor Demucs' model code nor torch._dynamo: each costs
    every start ~1-2 s on this machine."""
    found = heavy_modules_loaded({module: module for module in LIGHT_MODULES})
    assert found == {module: [] for module in LIGHT_MODULES}


def test_the_model_code_does_not_import_torch_dynamo():
    found = heavy_modules_loaded(
        {"model code": "serve_graph.engine.separator,serve_graph.engine.pipeline"})
    assert "torch" in found["model code"] and "torch._dynamo" not in found["model code"]


def test_the_simulated_accelerator_stand_in_keeps_its_wait_and_waits_without_a_core(tmp_path):
    """`StandInModel(seconds_per_window=...)` (benchmarks/batch_busy.py): saved and loaded
    through Demucs' path with its wait; a forward is the mix times the gains, after waiting
    that long per window with the core free (as a thread waits for a GPU)."""
    import time

    import torch as th

    from serve_graph.engine.models import StandInModel, save_bag, save_checkpoint
    save_checkpoint(StandInModel(seconds_per_window=0.05), tmp_path, "simulated")
    save_bag(tmp_path, "htdemucs", ["simulated"], None, None)
    model = load_model("htdemucs", tmp_path).models[0]
    assert isinstance(model, StandInModel) and model.seconds_per_window == 0.05
    mix = th.randn(3, 2, 1000)
    wall, cpu = time.perf_counter(), time.process_time()
    with th.inference_mode():
        out = model(mix)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert th.equal(out, mix[:, None] * model.gains[None, :, None, None])
    assert wall >= 0.15 and cpu < 0.1
