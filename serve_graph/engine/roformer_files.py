"""RoFormer checkpoints in a local model repo: `<name>.yaml` (MSST's config) beside
`<name>.ckpt` (a state dict, as MSST/UVR publish them), loaded strictly with
`torch.load(weights_only=True)`; and random-weight checkpoints of the published
architectures at any width and depth, for tests and benchmarks.

The templates are the configs' `model` sections as published (MSST's configs/viperx/
model_bs_roformer_ep_317_sdr_12.9755.yaml and configs/KimberleyJensen/
config_vocals_mel_band_roformer_kj.yaml), with the keys that matter at inference.
"""
import copy
import typing as tp
from pathlib import Path

import torch as th
import yaml

from .errors import ModelNotFoundError
from .roformer import Roformer
from .roformer_config import RoformerConfig, RoformerConfigError, read_config

CONFIG_SUFFIX, WEIGHTS_SUFFIX = ".yaml", ".ckpt"
# where a checkpoint keeps its state dict: MSST's `load_start_checkpoint` looks in these
WRAPPING_KEYS = ("state", "state_dict", "model_state_dict")

_AUDIO = {"chunk_size": 352800, "num_channels": 2, "sample_rate": 44100}
_TRAINING = {"instruments": ["vocals", "other"], "target_instrument": "vocals"}
_STFT = {"dim_freqs_in": 1025, "stft_n_fft": 2048, "stft_hop_length": 441,
         "stft_win_length": 2048, "stft_normalized": False}
VIPERX_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
TEMPLATES: tp.Dict[str, tp.Dict[str, tp.Any]] = {
    # viperx BS-RoFormer ep_317 (vocals, SDR 12.98 on MSST's validation set)
    "bs_roformer": {
        "audio": _AUDIO, "training": _TRAINING, "inference": {"num_overlap": 2},
        "model": {"dim": 512, "depth": 12, "stereo": True, "num_stems": 1,
                  "time_transformer_depth": 1, "freq_transformer_depth": 1,
                  "linear_transformer_depth": 0, "freqs_per_bands": VIPERX_BANDS,
                  "dim_head": 64, "heads": 8, "attn_dropout": 0.1, "ff_dropout": 0.1,
                  "flash_attn": True, **_STFT, "mask_estimator_depth": 2}},
    # Kim's Mel-Band RoFormer vocals
    "mel_band_roformer": {
        "audio": _AUDIO, "training": _TRAINING, "inference": {"num_overlap": 2},
        "model": {"dim": 384, "depth": 6, "stereo": True, "num_stems": 1,
                  "time_transformer_depth": 1, "freq_transformer_depth": 1,
                  "num_bands": 60, "dim_head": 64, "heads": 8, "attn_dropout": 0,
                  "ff_dropout": 0, "flash_attn": True, "sample_rate": 44100, **_STFT,
                  "mask_estimator_depth": 2}},
}


def paths(name: str, repo: tp.Union[str, Path]) -> tp.Tuple[Path, Path]:
    """`(config, weights)` of RoFormer `name` in `repo`."""
    return Path(repo) / f"{name}{CONFIG_SUFFIX}", Path(repo) / f"{name}{WEIGHTS_SUFFIX}"


def is_roformer(name: str, repo: tp.Optional[tp.Union[str, Path]]) -> bool:
    """Whether `repo` holds `name` as a RoFormer: its `<name>.ckpt` is there (Demucs' models
    are `.th` checkpoints and `.yaml` bags)."""
    return repo is not None and paths(name, repo)[1].is_file()


def load(name: str, repo: tp.Union[str, Path]) -> Roformer:
    """The RoFormer `name` of `repo`, weights loaded strictly, in eval mode.
    `ModelNotFoundError` names the file that is missing or does not fit;
    `roformer_config.RoformerConfigError` says what in the config cannot be run."""
    config_path, weights_path = paths(name, repo)
    for path in (weights_path, config_path):
        if not path.is_file():
            raise ModelNotFoundError(f"RoFormer {name!r} needs {path}: put MSST's "
                                     f"{name}{CONFIG_SUFFIX} and {name}{WEIGHTS_SUFFIX} in {repo}")
    try:
        config = read_config(config_path)
    except RoformerConfigError as exc:
        raise ModelNotFoundError(str(exc)) from None
    model = Roformer(config)
    state = _state_dict(weights_path)
    missing, unexpected = _mismatch(model, state)
    if missing or unexpected:
        raise ModelNotFoundError(
            f"{weights_path} does not fit {config_path}: missing {_some(missing)}, "
            f"unexpected {_some(unexpected)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _state_dict(path: Path) -> tp.Dict[str, th.Tensor]:
    try:
        state = th.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (a pickle with code in it, a truncated file)
        raise ModelNotFoundError(f"{path} is not a checkpoint torch loads with "
                                 f"weights_only=True: {str(exc).splitlines()[0]}") from None
    for key in WRAPPING_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelNotFoundError(f"{path} holds no state dict")
    return state


def _mismatch(model: th.nn.Module, state: tp.Mapping[str, th.Tensor]
              ) -> tp.Tuple[tp.List[str], tp.List[str]]:
    """Keys the model has and the file lacks (or holds in another shape), and keys the file
    has and the model does not."""
    own = model.state_dict()
    missing = [key for key, value in own.items()
               if key not in state or tuple(state[key].shape) != tuple(value.shape)]
    return missing, [key for key in state if key not in own]


def _some(keys: tp.Sequence[str], shown: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def scaled(family: str, **model: tp.Any) -> tp.Dict[str, tp.Any]:
    """A copy of `family`'s template with `model` keys replaced (dim, depth, heads...)."""
    raw = copy.deepcopy(TEMPLATES[family])
    raw["model"].update(model)
    return raw


def write_config(path: tp.Union[str, Path], raw: tp.Mapping[str, tp.Any]) -> Path:
    """`raw` as MSST writes its YAMLs (tuples as `!!python/tuple`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(dict(raw), Dumper=yaml.Dumper, sort_keys=False))
    return path


def random_model(config: RoformerConfig, seed: int = 0) -> Roformer:
    """`config`'s architecture with random weights: PyTorch's initialisation, and every norm's
    gain drawn around 1 (so that a test sees them)."""
    th.manual_seed(seed)
    model = Roformer(config)
    with th.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.add_(0.1 * th.randn_like(parameter))
    return model.eval()


def make_random(repo: tp.Union[str, Path], name: str, raw: tp.Mapping[str, tp.Any],
                seed: int = 0) -> Roformer:
    """Write `<name>.yaml` (`raw`) and `<name>.ckpt` (a random model of it, a plain state
    dict as MSST saves one) into `repo`; returns the model."""
    config_path, weights_path = paths(name, repo)
    write_config(config_path, raw)
    model = random_model(read_config(config_path), seed)
    th.save(model.state_dict(), weights_path)
    return model
