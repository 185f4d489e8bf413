"""Where a model's weight files are, and which one is missing: files only, no torch.

Demucs finds a model by name in a local model repo (`<sig>-<checksum>.th` checkpoints and
`<name>.yaml` bags, `demucs.repo.LocalRepo`/`BagOnlyRepo`), else in its remote list
(`demucs/remote/files.txt`) downloaded into torch hub's cache, or on the Hugging Face hub. The
launcher, Serve's build task and a Separate replica answering for a model not loaded ask
whether the files are there before anything loads; importing torch and Demucs' model code
for that would cost a second or more of every start. The few rules of Demucs' and torch's that
this needs are written again here, and `tests/test_models.py` holds them equal to Demucs'
`LocalRepo.scan`, `_parse_remote_files`, `hf_repo_name` and `torch.hub.get_dir`.
"""
import os
import typing as tp
from pathlib import Path

import yaml

from .errors import ModelNotFoundError

DEFAULT_MODEL = "htdemucs"
HF_NAMESPACE = "adefossez"  # demucs.hf.DEFAULT_NAMESPACE
REMOTE_URL = "https://dl.fbaipublicfiles.com/demucs/"  # demucs.pretrained.ROOT_URL


def _demucs_root() -> Path:
    """Demucs' package folder, found without importing it (its `__init__` is light, but
    `find_spec` does not even run that)."""
    import importlib.util
    spec = importlib.util.find_spec("demucs")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("demucs is not installed")
    return Path(spec.origin).parent


def remote_root() -> Path:
    """`demucs.pretrained.REMOTE_ROOT`: the bag files and `files.txt` Demucs ships."""
    return _demucs_root() / "remote"


def remote_files() -> tp.Dict[str, str]:
    """`{signature: download URL}` of Demucs' remote models, as `_parse_remote_files` reads
    `files.txt`: `root:` lines set the folder of the lines after them."""
    root, models = "", {}
    for line in (remote_root() / "files.txt").read_text().split("\n"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("root:"):
            root = line.split(":", 1)[1].strip()
        else:
            models[line.split("-", 1)[0]] = REMOTE_URL + root + line
    return models


def local_checkpoints(repo: Path) -> tp.Dict[str, Path]:
    """`{signature: file}` of the checkpoints in a local model repo, as `LocalRepo.scan`
    finds them (`<sig>-<checksum>.th` or `<sig>.th`)."""
    found = {}
    for file in repo.iterdir():
        if file.suffix == ".th":
            found[file.stem.rsplit("-", 1)[0] if "-" in file.stem else file.stem] = file
    return found


def hf_repo_name(name: str) -> str:
    """`demucs.hf.hf_repo_name`: `htdemucs` -> `HTDemucs`, `htdemucs_ft` -> `HTDemucs-ft`,
    others `Demucs-<name>`."""
    if name == "htdemucs":
        return "HTDemucs"
    if name.startswith("htdemucs_"):
        return "HTDemucs-" + name[len("htdemucs_"):]
    return "Demucs-" + name


def hub_dir() -> str:
    """`torch.hub.get_dir()` without `set_dir`: `$TORCH_HOME/hub`, `$TORCH_HOME` defaulting
    to `$XDG_CACHE_HOME/torch` and that to `~/.cache/torch`."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"),
                                                "torch"))
    return os.path.join(os.path.expanduser(home), "hub")


def weights_problem(name: str, repo: tp.Optional[tp.Union[str, Path]] = None
                    ) -> tp.Optional[str]:
    """None when every weight file of model `name` is on this machine (in the local model
    `repo`, else in Demucs' caches: the Hugging Face hub's or torch hub's); else which file is
    missing and where it goes. Looks at files only: never loads, never downloads."""
    if repo is not None:
        try:
            check_local_repo(name, Path(repo))
        except ModelNotFoundError as exc:
            return str(exc)
        return None
    if _in_hf_cache(name) or _in_torch_cache(name):
        return None
    return remote_hint(name, FileNotFoundError("its weights are not in Demucs' caches"))


def _in_hf_cache(name: str) -> bool:
    """Whether `demucs.hf.get_hf_model(name)` finds its bag file and every model file in the
    Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache
    repo_id = f"{HF_NAMESPACE}/{hf_repo_name(name)}"
    bag_file = try_to_load_from_cache(repo_id, f"{name}.yaml")
    if not isinstance(bag_file, str):
        return False
    signatures = yaml.safe_load(Path(bag_file).read_text())["models"]
    return all(isinstance(try_to_load_from_cache(repo_id, f"{sig}.safetensors"), str)
               for sig in signatures)


def _in_torch_cache(name: str) -> bool:
    """Whether Demucs' legacy remote repo finds every checkpoint of `name` (a bag name or a
    signature) in torch hub's cache."""
    urls = remote_files()
    bag_file = remote_root() / f"{name}.yaml"
    signatures = yaml.safe_load(bag_file.read_text())["models"] if bag_file.is_file() else [name]
    if not all(sig in urls for sig in signatures):
        return False
    cache = Path(hub_dir()) / "checkpoints"
    return all((cache / urls[sig].rsplit("/", 1)[-1]).is_file() for sig in signatures)


def check_local_repo(name: str, repo: Path) -> None:
    """Raise `ModelNotFoundError` naming the file that model `name` (a checkpoint signature,
    a bag or a RoFormer) lacks in the local model `repo`."""
    if not repo.is_dir():
        raise ModelNotFoundError(
            f"model repo {repo} is not a directory: create it and put the model's "
            f"checkpoint(s) <signature>-<checksum>.th and bag file {name}.yaml in it")
    if _check_roformer(name, repo):
        return
    checkpoints = local_checkpoints(repo)
    if name in checkpoints:
        return
    bag_file = repo / f"{name}.yaml"
    if not bag_file.is_file():
        raise ModelNotFoundError(
            f"model {name!r} not found in {repo}: expected {bag_file} (a bag listing "
            f"signatures) or a checkpoint {repo}/{name}-<checksum>.th")
    signatures = yaml.safe_load(bag_file.read_text())["models"]
    urls = remote_files()
    for sig in signatures:
        if sig not in checkpoints:
            source = f" (download it from {urls[sig]})" if sig in urls else ""
            raise ModelNotFoundError(
                f"model {name!r} needs checkpoint {sig}-<checksum>.th, missing from "
                f"{repo}{source}: put the file in {repo}")


def _check_roformer(name: str, repo: Path) -> bool:
    """True when `repo` holds RoFormer `name` whole (`<name>.ckpt` and a config this project
    runs: `roformer_config.read_config`); False when it holds no RoFormer of that name;
    `ModelNotFoundError` naming the missing file, or what the config gets wrong."""
    from .roformer_config import RoformerConfigError, is_roformer_config, read_config
    weights, config = repo / f"{name}.ckpt", repo / f"{name}.yaml"
    if not weights.is_file():
        if config.is_file() and is_roformer_config(config):
            raise ModelNotFoundError(f"RoFormer {name!r} needs its weights {weights} beside "
                                     f"its config {config}: put the .ckpt file there")
        return False
    if not config.is_file():
        raise ModelNotFoundError(f"RoFormer {name!r} needs its config {config} beside "
                                 f"{weights}: put MSST's YAML of that checkpoint there")
    try:
        read_config(config)
    except RoformerConfigError as exc:
        raise ModelNotFoundError(str(exc)) from None
    return True


def remote_hint(name: str, exc: BaseException) -> str:
    """Why pretrained model `name` could not be had (`exc`), and which files to put where."""
    bag_file = remote_root() / f"{name}.yaml"
    cache = Path(hub_dir()) / "checkpoints"
    hint = (f"could not load pretrained model {name!r} ({type(exc).__name__}: {exc}). "
            f"Without internet, put its checkpoint(s) in {cache}, or in a folder together with "
            f"a copy of {bag_file} and pass that folder as the model repo")
    if bag_file.is_file():
        urls = remote_files()
        sigs = yaml.safe_load(bag_file.read_text())["models"]
        files = [urls.get(sig, f"{sig}-<checksum>.th") for sig in sigs]
        hint += ": " + ", ".join(files)
    return hint
