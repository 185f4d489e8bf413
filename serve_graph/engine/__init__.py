"""The numeric engine: model loading, window planning, batched model calls, overlap-add and
audio I/O. Plain functions on tensors; no Ray here (the deployments call into this)."""
from .audio import decode, select_stems, zip_files
from .errors import (AudioTooLongError, InvalidAudioError, InvalidParameterError,
                     ModelMissingError, ModelNotFoundError, ModelUnavailableError, SeparationError,
                     UploadTooLargeError)
from .models import DEFAULT_MODEL, load_model, make_random_repo, model_geometry
from .output import encode_stem
from .options import SeparationOptions
from .pipeline import Song, SongWriter, prepare, separate_to_zip
from .separator import PRECISIONS, ModelRunner, default_device, separate
from .windows import ModelGeometry, OverlapAdd, Plan, Window, plan_windows

__all__ = [
    "AudioTooLongError", "DEFAULT_MODEL", "InvalidAudioError", "InvalidParameterError",
    "ModelGeometry", "ModelMissingError", "ModelNotFoundError", "ModelRunner", "ModelUnavailableError", "OverlapAdd", "PRECISIONS", "Plan",
    "SeparationError", "SeparationOptions", "UploadTooLargeError", "Window", "decode",
    "default_device", "encode_stem", "load_model", "make_random_repo", "model_geometry",
    "plan_windows", "prepare", "select_stems", "separate", "separate_to_zip", "Song", "SongWriter",
    "zip_files",
]
