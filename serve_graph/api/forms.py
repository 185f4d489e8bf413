"""The form of `POST /separate` and `POST /jobs`: one field per `SeparationOptions` field,
derived from it (type, range or choices, default, description), and the checks FastAPI does
not make (unknown, repeated and blank fields)."""
import inspect
from collections import Counter

from fastapi import File, Form, Request

from ..engine import InvalidParameterError
from ..engine.options import request_fields

AUDIO_FILE_HELP = ("The song: any format FFmpeg decodes (mp3, wav, flac, ogg, opus, m4a...), at "
                   "most `max_upload_mb` (GET /). Send it, or `audio_url`")
AUDIO_URL_HELP = ("Instead of `audio_file`: an http(s) URL of the song, downloaded under the same "
                  "size limit and within `url_timeout_s`; public addresses only (and the "
                  "networks the operator allows), every redirect checked")
CALLBACK_URL_HELP = ("An http(s) URL that gets the job's status JSON (POST, signed as Standard "
                     "Webhooks: webhook-id, webhook-timestamp, webhook-signature) when the job "
                     "ends; retried with backoff; public addresses only")
MAX_URL_LENGTH = 2048
URL_SCHEMA = {"format": "uri", "pattern": "^https?://", "maxLength": MAX_URL_LENGTH}


def _no_null(schema: dict) -> None:
    """An optional form field's schema without its `null` branch: a form cannot send null,
    it leaves the field out."""
    choices = [branch for branch in schema.pop("anyOf", []) if branch.get("type") != "null"]
    if len(choices) == 1:
        schema.update(choices[0])


def _url_schema(schema: dict) -> None:
    _no_null(schema)
    schema.update(URL_SCHEMA)


# the song's two forms, either one (the schema says so: `openapi.SONG_CHOICE`), and a callback
AUDIO_FILE = File(None, description=AUDIO_FILE_HELP, json_schema_extra=_no_null)
AUDIO_URL = Form(None, description=AUDIO_URL_HELP, max_length=MAX_URL_LENGTH,
                 json_schema_extra=_url_schema)
CALLBACK_URL = Form(None, description=CALLBACK_URL_HELP, max_length=MAX_URL_LENGTH,
                    json_schema_extra=_url_schema)


def with_option_fields(endpoint):
    """`endpoint(self, request, audio_file, ..., **fields)` with one form parameter per field
    of `SeparationOptions`, for FastAPI to parse, validate and document."""
    signature = inspect.signature(endpoint)
    fixed = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    options = []
    for field in request_fields():
        def schema(out: dict, extra: dict = field.schema_extra) -> None:
            _no_null(out)
            out.update(extra)  # the schema's own choices win over the generic check
        options.append(inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, annotation=field.annotation,
            default=Form(field.default, description=field.description,
                         json_schema_extra=schema, **field.constraints)))
    endpoint.__signature__ = signature.replace(parameters=fixed + options)
    return endpoint


# an option sent empty is refused, as its schema says (no type, choice or pattern admits "")
_NOT_BLANK = {field.name for field in request_fields()}


def check_form_fields(request: Request, form) -> None:
    """Refuse fields the route does not take (a misspelt `shift=2` would otherwise be ignored in
    silence) and a field sent twice. The accepted names are the route's own form parameters."""
    accepted = {field.alias for field in request.scope["route"].dependant.body_params}
    counts = Counter(name for name, _ in form.multi_items())
    unknown = sorted(set(counts) - accepted)
    if unknown:
        raise InvalidParameterError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                    f"accepted: {', '.join(sorted(accepted))}")
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise InvalidParameterError(f"field(s) {', '.join(map(repr, repeated))} sent more "
                                    f"than once")
    # FastAPI reads an empty form value as the field left out: a default (shifts, overlap,
    # wav_depth...) would be taken in silence, against the schema
    blank = sorted(name for name, value in form.multi_items()
                   if value == "" and name in _NOT_BLANK)
    if blank:
        raise InvalidParameterError(f"field(s) {', '.join(map(repr, blank))} sent empty: give "
                                    f"a value or leave the field out")
