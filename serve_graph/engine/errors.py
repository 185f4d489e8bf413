"""Typed errors of the engine. Input problems carry the HTTP status the service answers with."""


class SeparationError(Exception):
    """Base of the errors a client caused; `status_code` and `error` go into the HTTP answer."""
    status_code = 400
    error = "bad_request"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class InvalidAudioError(SeparationError):
    """The bytes are not audio FFmpeg can decode: empty, corrupt, truncated, text, no audio."""
    status_code = 415
    error = "invalid_audio"


class AudioTooLongError(SeparationError):
    """The decoded audio is longer than the configured limit."""
    status_code = 413
    error = "audio_too_long"


class UploadTooLargeError(SeparationError):
    """The upload is larger than the configured limit (bytes)."""
    status_code = 413
    error = "upload_too_large"


class OverBudgetError(SeparationError):
    """The request needs more model windows than one request may take."""
    status_code = 413
    error = "over_budget"


class InvalidParameterError(SeparationError):
    """A separation parameter is out of range (shifts, overlap, bitrate, stem name...)."""
    status_code = 422
    error = "invalid_parameter"


class ModelUnavailableError(SeparationError):
    """The model is not loaded (its weights are missing, or its replica is still starting)."""
    status_code = 503
    error = "model_unavailable"


class ModelMissingError(SeparationError):
    """The model asked for is served here but its weights are not in place: the detail names
    the missing file and where it goes."""
    status_code = 404
    error = "model_missing"


class ModelNotFoundError(RuntimeError):
    """The model's weights are not where Demucs looks; the message says which file and where."""
