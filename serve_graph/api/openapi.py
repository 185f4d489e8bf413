"""The served OpenAPI document: FastAPI's, with the form bodies closed, the options that
exclude each other marked, and `model` limited to the models this replica serves."""
import functools
import itertools
import typing as tp

from fastapi import FastAPI

from ..engine.options import EXCLUSIVE_FIELDS
from .replica import settings as replica


def openapi_document(app: FastAPI, models: tp.Sequence[str] = ()) -> dict:
    """`app`'s schema as FastAPI generates it, with `additionalProperties: false` on the form
    bodies (the routes refuse fields they do not take, `forms.check_form_fields`) and the
    options that exclude each other (`EXCLUSIVE_FIELDS`) marked so, the song required as one
    of `SONG_FIELDS`; `model` lists `models`,
    those the service serves (any name when empty)."""
    schema = FastAPI.openapi(app)
    songs_taken = set()  # the bodies that take a song
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        if name.startswith("Body_"):
            component["additionalProperties"] = False
            if "model" in component.get("properties", {}) and models:
                component["properties"]["model"]["enum"] = list(models)
            if set(EXCLUSIVE_FIELDS) <= set(component.get("properties", {})):
                component["not"] = {"anyOf": conflicts()}
            if set(SONG_FIELDS) <= set(component.get("properties", {})):
                component["oneOf"] = [{"required": [name]} for name in SONG_FIELDS]
                songs_taken.add(name)
    for path in schema.get("paths", {}).values():  # a song is sent in every body that takes one
        for operation in path.values():
            body = operation.get("requestBody", {}).get("content", {}).get(
                "multipart/form-data", {}).get("schema", {}).get("$ref", "")
            if body.rsplit("/", 1)[-1] in songs_taken:
                operation["requestBody"]["required"] = True
    invalid_parameters_as_error_bodies(schema)
    return schema


def invalid_parameters_as_error_bodies(schema: dict) -> None:
    """A 422 of FastAPI's validation has the body every error has (`errors`: `{"error":
    "invalid_parameter", "detail"}`), not FastAPI's `HTTPValidationError`: so documented."""
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            invalid = operation.get("responses", {}).get("422", {})
            content = invalid.get("content", {}).get("application/json", {})
            if content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                content["schema"] = error_body
                invalid["description"] = "invalid parameter (error invalid_parameter)"
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


SONG_FIELDS = ("audio_file", "audio_url")  # a song is sent as exactly one of them


def conflicts() -> tp.List[dict]:
    """The option combinations refused (422), as schemas: two of the stem choices, or one of
    them with `format=stems` (which holds every stem)."""
    pairs = [{"required": list(pair)} for pair in itertools.combinations(EXCLUSIVE_FIELDS, 2)]
    return pairs + [{"required": ["format", name], "properties": {"format": {"const": "stems"}}}
                    for name in EXCLUSIVE_FIELDS]


def served_document(app: FastAPI) -> dict:
    """`openapi_document` for this replica's models."""
    return openapi_document(app, replica.models)


def install(app: FastAPI) -> None:
    """Serve `served_document`. A partial of this module's function, not a closure: Serve
    pickles `app` into the replica, where the function must read this module's `replica`
    (which `Ingress.__init__` configures), not a copy of it."""
    app.openapi = functools.partial(served_document, app)  # type: ignore[method-assign]
