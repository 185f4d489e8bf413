"""RoFormer checkpoints as MSST and UVR publish them: `<name>.ckpt` (a state dict) beside
`<name>.yaml`, read here into a frozen `RoformerConfig` (no torch).

The YAML's sections: `audio` (chunk_size, sample_rate, num_channels), `model` (the
constructor's keyword arguments of MSST's `BSRoformer` or `MelBandRoformer`), `training`
(instruments, target_instrument) and `inference` (num_overlap). The family is told by the
model's band layout: `freqs_per_bands` (BS-RoFormer) or `num_bands` (Mel-Band RoFormer), as
MSST's own configs of each family give it.

Every key of `model` is honoured, accepted as training-only, or refused by name
(`RoformerConfigError`): a checkpoint whose architecture this project would get wrong is not
loaded. The files are read with a safe loader that knows one Python tag, `!!python/tuple`
(MSST writes `freqs_per_bands` with it), and refuses every other.
"""
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

FAMILIES = ("bs_roformer", "mel_band_roformer")
INSTRUMENTAL = "instrumental"  # a one-target model's second stem: the mix minus the target

# the architecture: each changes what the weights compute (name: MSST's default)
ARCHITECTURE = {"depth": None, "stereo": False, "num_stems": 1, "time_transformer_depth": 2,
                "freq_transformer_depth": 2, "dim_head": 64, "heads": 8,
                "dim_freqs_in": 1025, "stft_n_fft": 2048, "stft_hop_length": 512,
                "stft_win_length": 2048, "stft_normalized": False, "zero_dc": True,
                "mask_estimator_depth": 2, "mlp_expansion_factor": 4,
                "skip_connection": False}
BS_ONLY = {"freqs_per_bands": None}
MEL_ONLY = {"num_bands": 60, "sample_rate": 44100}
# training-only: no effect on a forward pass in eval mode (dropouts, the loss, checkpointing,
# which attention kernel computes the same softmax attention)
TRAINING_ONLY = ("attn_dropout", "ff_dropout", "flash_attn", "use_torch_checkpoint",
                 "multi_stft_resolution_loss_weight", "multi_stft_resolutions_window_sizes",
                 "multi_stft_hop_size", "multi_stft_normalized")
# features of MSST's code this project does not implement: refused unless off
REFUSED_UNLESS = {"linear_transformer_depth": 0, "use_pope": False,
                  "match_input_audio_length": False}


class RoformerConfigError(ValueError):
    """A RoFormer YAML this project cannot run as its authors meant: the message names the
    file, the key and why."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader and `!!python/tuple` (a sequence, as a tuple); other Python tags
    stay refused."""


_ConfigLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: tuple(loader.construct_sequence(node, deep=True)))


@dataclass(frozen=True)
class RoformerConfig:
    """One RoFormer checkpoint's configuration.

    - `family`: "bs_roformer" or "mel_band_roformer";
    - `dim`: the model's width; `architecture`: every honoured key of `model` (MSST's defaults
      filled in), as its constructor takes them;
    - `chunk_size`: samples per window at `samplerate` Hz; `channels`: 2 when stereo;
    - `instruments`: what the model was trained on; `target`: a one-stem model's output;
    - `num_overlap`: windows covering each sample (MSST's `demix`: step = chunk // num_overlap).
    """
    family: str
    dim: int
    architecture: tp.Mapping[str, tp.Any] = field(repr=False)
    chunk_size: int
    samplerate: int
    channels: int
    instruments: tp.Tuple[str, ...]
    target: tp.Optional[str]
    num_overlap: int

    @property
    def sources(self) -> tp.Tuple[str, ...]:
        """The stems a request gets: a one-target model's target and `instrumental` (the mix
        minus it), else the model's outputs in order."""
        if self.architecture["num_stems"] == 1:
            return (self.target, INSTRUMENTAL)
        return self.instruments


def read_config(path: tp.Union[str, Path]) -> RoformerConfig:
    """`path` (a `<name>.yaml`) as a `RoformerConfig`; `RoformerConfigError` naming what
    cannot be used."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_ConfigLoader)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise RoformerConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RoformerConfigError(f"{path}: not a config this project reads safely: "
                                  f"{str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise RoformerConfigError(f"{path}: no `model:` section")
    return _config(path, raw)


def is_roformer_config(path: Path) -> bool:
    """Whether the YAML at `path` is a model config (a `model:` section), not a Demucs bag
    (`models:`); False when it does not read."""
    try:
        raw = yaml.load(path.read_text(), Loader=_ConfigLoader)  # noqa: S506 - a safe loader
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict)


def _config(path: Path, raw: dict) -> RoformerConfig:
    model, audio = raw["model"], raw.get("audio") or {}
    family = _family(path, model)
    architecture = _architecture(path, model, family)
    training, inference = raw.get("training") or {}, raw.get("inference") or {}
    instruments = tuple(training.get("instruments") or ())
    target = training.get("target_instrument")
    config = RoformerConfig(
        family=family, dim=_integer(path, model, "dim"), architecture=architecture,
        # MSST's demix: the inference section's chunk_size, else the audio section's
        chunk_size=_integer(path, inference if "chunk_size" in inference else audio,
                            "chunk_size"),
        samplerate=int(audio.get("sample_rate", 44100)),
        channels=2 if architecture["stereo"] else 1, instruments=instruments, target=target,
        num_overlap=int(inference.get("num_overlap", 4)))
    _check_inference(path, config, inference)
    _check(path, config, audio)
    return config


def _family(path: Path, model: dict) -> str:
    bands = [key for key in ("freqs_per_bands", "num_bands") if key in model]
    if len(bands) != 1:
        raise RoformerConfigError(
            f"{path}: `model:` must give exactly one of freqs_per_bands (BS-RoFormer) and "
            f"num_bands (Mel-Band RoFormer); it gives {bands or 'neither'}")
    return "bs_roformer" if bands[0] == "freqs_per_bands" else "mel_band_roformer"


def _architecture(path: Path, model: dict, family: str) -> tp.Dict[str, tp.Any]:
    """The honoured keys with MSST's defaults filled in; refuses unknown keys and the
    features not implemented here when they are on."""
    honoured = {**ARCHITECTURE, **(BS_ONLY if family == "bs_roformer" else MEL_ONLY)}
    unknown = sorted(set(model) - set(honoured) - set(TRAINING_ONLY) - set(REFUSED_UNLESS)
                     - {"dim"})
    if unknown:
        raise RoformerConfigError(f"{path}: `model:` keys this project does not know for "
                                  f"{family}: {', '.join(unknown)}")
    for key, off in REFUSED_UNLESS.items():
        if model.get(key, off) != off:
            raise RoformerConfigError(f"{path}: `model: {key}: {model[key]}` is not supported "
                                      f"(only {key}: {off})")
    architecture = {key: model.get(key, default) for key, default in honoured.items()}
    missing = [key for key, value in architecture.items() if value is None]
    if missing:
        raise RoformerConfigError(f"{path}: `model:` lacks {', '.join(missing)}")
    if family == "bs_roformer":
        architecture["freqs_per_bands"] = tuple(architecture["freqs_per_bands"])
    return architecture


def _check(path: Path, config: RoformerConfig, audio: dict) -> None:
    """The sections agree with each other (bands cover the STFT's bins, stems are named)."""
    arch = config.architecture
    bins = arch["stft_n_fft"] // 2 + 1
    if arch["dim_freqs_in"] != bins:
        raise RoformerConfigError(f"{path}: dim_freqs_in {arch['dim_freqs_in']} is not "
                                  f"stft_n_fft // 2 + 1 = {bins}")
    if config.family == "bs_roformer" and sum(arch["freqs_per_bands"]) != bins:
        raise RoformerConfigError(f"{path}: freqs_per_bands add up to "
                                  f"{sum(arch['freqs_per_bands'])}, not the STFT's {bins} bins")
    if int(audio.get("num_channels", config.channels)) != config.channels:
        raise RoformerConfigError(f"{path}: audio.num_channels {audio['num_channels']} but "
                                  f"model.stereo is {arch['stereo']}")
    if arch["num_stems"] == 1:
        if not config.target:
            raise RoformerConfigError(f"{path}: a one-stem model needs "
                                      f"training.target_instrument")
    elif len(config.instruments) != arch["num_stems"]:
        raise RoformerConfigError(f"{path}: num_stems {arch['num_stems']} but "
                                  f"training.instruments names {len(config.instruments)}")
    if config.num_overlap < 1 or config.chunk_size < 1:
        raise RoformerConfigError(f"{path}: inference.num_overlap and audio.chunk_size must "
                                  f"be positive")


SERVICE_RATE = 44100  # what Decode gives every model: 44.1 kHz stereo


def _check_inference(path: Path, config: RoformerConfig, inference: dict) -> None:
    """What this service runs differently from MSST's `inference.py` is refused: another
    sample rate or mono (Decode gives 44.1 kHz stereo), the mix normalised (no RoFormer config
    of MSST's asks for it), a Mel-Band RoFormer window that its iSTFT would shorten (MSST's
    `demix` fails on it), and a multi-stem model naming one target (MSST's `demix` then
    keeps one stem of several)."""
    arch = config.architecture
    if config.samplerate != SERVICE_RATE or arch.get("sample_rate", SERVICE_RATE) != SERVICE_RATE:
        raise RoformerConfigError(f"{path}: the sample rate must be {SERVICE_RATE} Hz "
                                  f"(audio.sample_rate {config.samplerate})")
    if not arch["stereo"]:
        raise RoformerConfigError(f"{path}: `model: stereo: False` is not supported (the "
                                  f"service separates stereo audio)")
    if inference.get("normalize", False):
        raise RoformerConfigError(f"{path}: `inference: normalize: True` is not supported")
    hop = arch["stft_hop_length"]
    if config.family == "mel_band_roformer" and config.chunk_size % hop:
        raise RoformerConfigError(f"{path}: chunk_size {config.chunk_size} is not a multiple "
                                  f"of stft_hop_length {hop}")
    if arch["num_stems"] > 1 and config.target:
        raise RoformerConfigError(f"{path}: num_stems {arch['num_stems']} with "
                                  f"training.target_instrument {config.target!r}: give one")


def _integer(path: Path, section: dict, key: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RoformerConfigError(f"{path}: {key} must be an integer, got {value!r}")
    return value
