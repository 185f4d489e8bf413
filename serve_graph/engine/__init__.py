"""The numeric engine: model loading, window planning, batched model calls, overlap-add and
audio I/O. Plain functions on arrays and tensors; no Ray here (the deployments call into this).
Only the model's side (`separator`, `windows`, `forward`, `models`) needs torch: decoding, the
normalisation, overlap-add and the writers are NumPy, so Decode and Encode never import it.

The names below load their module on first use (PEP 562), so that importing one light part
(`options`, `errors`) does not import torch and Demucs: the launcher and the Ingress replica
need only those, and a cold start pays for each import in every process."""
import importlib
import typing as tp

_HOMES = {  # name: the submodule that defines it
    "decode": "audio", "probe": "audio", "select_stems": "audio", "zip_files": "audio",
    "AudioTooLongError": "errors", "InvalidAudioError": "errors",
    "InvalidParameterError": "errors", "ModelMissingError": "errors",
    "ModelNotFoundError": "errors", "ModelUnavailableError": "errors",
    "SeparationError": "errors", "UploadTooLargeError": "errors",
    "DEFAULT_MODEL": "model_files", "load_model": "models", "make_random_repo": "models",
    "model_geometry": "models",
    "encode_stem": "output",
    "SeparationOptions": "options",
    "Song": "plan", "SongWriter": "pipeline", "prepare": "pipeline",
    "separate_to_zip": "pipeline", "SplitDecoder": "split_decode",
    "PRECISIONS": "modes", "ModelRunner": "separator", "default_device": "separator",
    "separate": "separator", "run_windows": "separator",
    "ModelGeometry": "plan", "Plan": "plan", "Window": "plan", "plan_windows": "plan",
    "OverlapAdd": "overlap_add",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> tp.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> tp.List[str]:
    return sorted(set(globals()) | set(_HOMES))
