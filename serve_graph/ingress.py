"""The HTTP front: FastAPI on Ray Serve. `POST /separate` and `GET /`, the original API."""
import asyncio
import inspect
import logging
import time
import types
import typing as tp
import uuid
from collections import Counter
from http import HTTPStatus
from pathlib import PurePath

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.serve.handle import DeploymentHandle

from .access import ConcurrencyLimit, bearer_token, load_keys, matching_key
from .engine import (InvalidAudioError, InvalidParameterError, ModelMissingError,
                     ModelUnavailableError, SeparationError, SeparationOptions,
                     UploadTooLargeError)
from .engine.options import EXCLUSIVE_FIELDS, request_fields
from .launch import keep_replica_server_on_loopback
from .messages import SONG_LOST, retrying
from .settings import ServiceSettings

logger = logging.getLogger("ray.serve")
HEALTH_WAIT_S = 2.  # how long GET / waits for a Separate replica before saying "loading"

app = FastAPI(
    title="Stem separation",
    description="Upload a song, get its stems (vocals, drums, bass, other...) back as a ZIP, "
                "separated by Demucs v4 (htdemucs, or another model: GET /models).",
    version="1.0")

def object_store_usage() -> dict:
    """Bytes and objects in the Ray object store, from Ray's memory report (cluster-wide)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address
        stats = get_memory_info_reply(get_state_from_address(None)).store_stats
        return {"bytes_used": int(stats.object_store_bytes_used),
                "objects": int(stats.num_local_objects)}
    except Exception as exc:  # noqa: BLE001 - a private API: report, never fail /stats
        return {"unavailable": repr(exc)[:200]}


class ErrorBody(BaseModel):
    """Every error's body."""
    error: str = Field(description="a stable code, e.g. invalid_audio")
    detail: str = Field(description="what was wrong, for a person")


def _documented(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: tp.Dict[tp.Union[int, str], dict] = {
    400: _documented("malformed request (multipart)"),
    401: _documented("API keys are configured and none valid was sent"),
    404: _documented("the model asked for is served here but its weights are missing"),
    413: _documented("upload or audio too long, or over the window budget"),
    415: _documented("not decodable audio"),
    422: _documented("invalid parameter"),
    429: _documented("too many separations in flight for this client"),
    503: _documented("the model is loading or missing"),
}


def _no_null(schema: dict) -> None:
    """An optional form field's schema without its `null` branch: a form cannot send null,
    it leaves the field out."""
    choices = [branch for branch in schema.pop("anyOf", []) if branch.get("type") != "null"]
    if len(choices) == 1:
        schema.update(choices[0])


AUDIO_FILE_HELP = ("The song: any format FFmpeg decodes (mp3, wav, flac, ogg, opus, m4a...), at "
                   "most `max_upload_mb` (GET /)")


def with_option_fields(endpoint):
    """`endpoint(self, request, audio_file, **fields)` with one form parameter per field of
    `SeparationOptions` (type, range or choices, default, description), for FastAPI to parse,
    validate and document."""
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


_generated_openapi = app.openapi


def _openapi_with_closed_forms() -> dict:
    """FastAPI's schema, with `additionalProperties: false` on the form bodies (the routes
    refuse fields they do not take, `check_form_fields`) and the options that exclude each
    other (`EXCLUSIVE_FIELDS`) marked so; `model` lists the models this service serves."""
    schema = _generated_openapi()
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        if name.startswith("Body_"):
            component["additionalProperties"] = False
            if "model" in component.get("properties", {}) and _config.models:
                component["properties"]["model"]["enum"] = list(_config.models)
            if set(EXCLUSIVE_FIELDS) <= set(component.get("properties", {})):
                component["not"] = {"required": list(EXCLUSIVE_FIELDS)}
    return schema


app.openapi = _openapi_with_closed_forms  # type: ignore[method-assign]


def _error(status: int, error: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


def _ascii(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                   for c in name)


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


@app.exception_handler(SeparationError)
async def _separation_error(request: Request, exc: SeparationError) -> JSONResponse:
    return _error(exc.status_code, exc.error, exc.detail)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors FastAPI/Starlette raise themselves (malformed multipart, unknown route, wrong
    method), in the service's `{"error", "detail"}` shape."""
    if isinstance(exc, UploadCapExceeded):
        return _error(413, UploadTooLargeError.error, str(exc.detail))
    name = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    response = _error(exc.status_code, name, str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. `Allow` on a 405
    return response


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                         for e in exc.errors())
    return _error(422, "invalid_parameter", problems)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    cause = getattr(exc, "cause", None)  # a RayTaskError from another deployment
    if isinstance(cause, SeparationError):
        return _error(cause.status_code, cause.error, cause.detail)
    request_id = uuid.uuid4().hex
    logger.exception("request %s failed", request_id)
    return _error(500, "internal_error", "the separation failed; the error is logged",
                  request_id=request_id)


# What the middleware needs of this replica's settings, set by `Ingress.__init__`. Module-level
# on purpose: `@serve.ingress(app)` serves a frozen copy of `app`, made when the class below is
# decorated, so middleware must be registered before that and cannot read `app.state`.
_config = types.SimpleNamespace(max_upload_bytes=None, api_keys=[], limit=None,
                                cors_origins=(), models=())



def configure_middleware(settings: ServiceSettings) -> None:
    """Set `_config` from the replica's settings. A module function, so that the call from
    `Ingress.__init__` (whose class Serve pickles by value, copying the globals it names)
    reaches this module's `_config` in the replica."""
    _config.max_upload_bytes = settings.max_upload_bytes
    _config.api_keys = load_keys(settings.api_keys_file)
    _config.limit = ConcurrencyLimit(settings.max_concurrent_per_client)
    _config.cors_origins = settings.cors_origins
    _config.models = settings.served_models


OPEN_PATHS = {"/", "/healthz", "/readyz", "/models", "/docs", "/docs/oauth2-redirect", "/openapi.json",
              "/redoc"}
RETRY_AFTER_S = 5


FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the other fields, beside the file


def _too_large_detail(limit: int) -> str:
    return f"the upload is larger than the limit of {limit / 2**20:g} MB"


class UploadCapExceeded(HTTPException):
    """Raised while the body is read, once more than the limit has arrived: chunked uploads
    carry no Content-Length to refuse them by."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_detail(limit))


class _CappedBody:
    """Refuses an upload by its Content-Length before its body is read; without one (chunked
    uploads), counts the body bytes as they arrive and stops reading past the limit, so that
    no upload is spooled beyond it. Pure ASGI and innermost: an exception raised in `receive`
    under Starlette's BaseHTTPMiddleware would reach FastAPI wrapped in an exception group."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = _config.max_upload_bytes
        if scope["type"] != "http" or not limit:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit + FORM_OVERHEAD:
            response = _error(413, UploadTooLargeError.error, _too_large_detail(limit))
            return await response(scope, receive, send)
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit + FORM_OVERHEAD:
                    raise UploadCapExceeded(limit)
            return message

        await self.app(scope, capped_receive, send)


app.add_middleware(_CappedBody)  # the first added: innermost


@app.middleware("http")
async def _access(request: Request, call_next):
    """API keys (when configured) on everything but health and docs, then the per-client limit
    on separations; both answered from the headers, before the upload is read."""
    keys = _config.api_keys
    if request.url.path in OPEN_PATHS or request.method == "OPTIONS":
        return await call_next(request)
    key = matching_key(keys, bearer_token(request.headers.get("authorization")))
    if keys and key is None:
        response = _error(401, "unauthorized", "send a valid API key as "
                          "'Authorization: Bearer <key>'")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    limit = _config.limit
    if limit is None or request.url.path != "/separate":
        return await call_next(request)
    client = key or (request.client.host if request.client else "unknown")
    if not limit.try_enter(client):
        response = _error(429, "too_many_requests", f"at most {limit.limit} separations in "
                          f"flight per client; retry after {RETRY_AFTER_S} s")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    try:
        return await call_next(request)
    finally:
        limit.leave(client)


class _ConfiguredCORS:
    """CORS for the origins in the replica's settings (none: no CORS headers at all)."""

    def __init__(self, app):
        self.app = app
        self._cors = None

    async def __call__(self, scope, receive, send):
        if not _config.cors_origins:
            return await self.app(scope, receive, send)
        if self._cors is None:
            self._cors = CORSMiddleware(self.app, allow_origins=list(_config.cors_origins),
                                        allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"])
        await self._cors(scope, receive, send)


app.add_middleware(_ConfiguredCORS)  # outermost: browsers' preflights carry no key


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    """Validates the request, then drives the graph: Decode once (the mix goes to the object
    store), then Encode once, which runs the song's windows through Separate and returns the
    ZIP; window outputs never pass through here."""

    def __init__(self, decode: DeploymentHandle, separate: DeploymentHandle,
                 encode: DeploymentHandle, settings: ServiceSettings):
        self._decode, self._separate, self._encode = decode, separate, encode
        keep_replica_server_on_loopback()
        self._settings = settings
        self._default = settings.model
        self._infos: tp.Dict[str, dict] = {}  # the models seen loaded, by name
        self._geometries: tp.Dict[str, tp.Any] = {}
        self._handles: tp.Dict[str, DeploymentHandle] = {}
        self._max_bytes = settings.max_upload_bytes
        configure_middleware(settings)

    def _separate_for(self, model: str) -> DeploymentHandle:
        """Separate's handle for `model`, routed to replicas that have it loaded."""
        if model not in self._handles:
            self._handles[model] = self._separate.options(multiplexed_model_id=model)
        return self._handles[model]

    async def _model_info(self, model: str, load: bool = True) -> dict:
        """Separate's word on `model`: "loaded" (cached from then on), "available" (weights
        there, not loaded; only with `load` false), "missing" with the reason, or "loading"
        while no Separate replica answers within `HEALTH_WAIT_S`."""
        if model in self._infos:
            return self._infos[model]
        call = (self._separate_for(model).info.remote(model) if load else
                self._separate.describe.remote(model))
        try:
            info = await asyncio.wait_for(call, HEALTH_WAIT_S)
        except asyncio.TimeoutError:
            return {"model": model, "state": "loading",
                    "detail": f"no answer from Separate within {HEALTH_WAIT_S:g} s: its "
                              f"replica is starting, or loading a model"}
        if info["state"] == "loaded":
            self._infos[model] = info
        return info

    async def _models(self) -> tp.Dict[str, dict]:
        """Every served model's state: the default one loaded, the others described."""
        names = self._settings.served_models
        infos = await asyncio.gather(*(self._model_info(name, load=name == self._default)
                                       for name in names))
        return dict(zip(names, infos))

    async def _ready_model(self, model: str) -> dict:
        """`model`'s facts once it is loaded (it is loaded now if it is not); the default
        model answers 503 while its replica starts, any model 404 without its weights."""
        if model == self._default:
            info = await self._model_info(model)
        elif model in self._infos:
            info = self._infos[model]
        else:  # its weights looked for first: a missing model is answered at once
            info = await self._separate.describe.remote(model)
            if info["state"] != "missing":
                info = await self._separate_for(model).info.remote(model)
            if info["state"] == "loaded":
                self._infos[model] = info
        if info["state"] == "missing":
            if model == self._default:
                raise ModelUnavailableError(f"model {model!r} is missing: {info['detail']}")
            raise ModelMissingError(f"model {model!r} is not available: {info['detail']}")
        if info["state"] != "loaded":
            raise ModelUnavailableError(f"model {model!r} is {info['state']}: "
                                        f"{info['detail']}")
        return info

    def _health(self, info: dict, models: tp.Dict[str, dict]) -> dict:
        return {"status": {"loaded": "ok", "loading": "loading"}.get(info["state"],
                                                                     "unavailable"),
                **info,
                "models": {name: {key: model[key] for key in ("state", "detail") if key in model}
                           for name, model in models.items()},
                "max_upload_mb": self._settings.max_upload_mb,
                "max_audio_seconds": self._settings.max_audio_seconds}

    @app.get("/", summary="Health: status, the default model and whether each model served is "
             "loaded, available (loads on first use) or missing")
    async def health(self) -> dict:
        models = await self._models()
        return self._health(models[self._default], models)

    @app.get("/healthz", summary="Liveness: 200 while the HTTP front answers")
    async def liveness(self) -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: 200 once the default model is loaded, else 503",
             responses={503: {"description": "the model is loading or missing"}})
    async def readiness(self):
        info = await self._model_info(self._default)
        health = self._health(info, {self._default: info})
        if health["status"] == "ok":
            return {"status": "ready", "models": health["models"]}
        return _error(503, "not_ready", f"model {self._default!r} is {info['state']}",
                      models=health["models"])

    @app.get("/models", summary="The models served: for each, its state (loaded, available, "
             "missing with the file that is missing, loading), its stems and whether it is the "
             "default")
    async def models(self) -> dict:
        models = await self._models()
        return {"default": self._default,
                "models": [{"name": name, "default": name == self._default, **{
                    key: value for key, value in info.items() if key != "model"}}
                    for name, info in models.items()]}

    @app.get("/stats", summary="Batching counters and model seconds of the Separate deployment "
             "(one replica), and the object store's use")
    async def stats(self) -> dict:
        stats = await self._separate.stats.remote()
        stats["object_store"] = await asyncio.to_thread(object_store_usage)
        return stats

    @app.post("/separate", summary="Separate a song into stems, returned as a ZIP",
              response_class=Response,
              responses={200: {"content": {"application/zip": {}},
                               "description": "ZIP of the stems"}, **ERROR_RESPONSES})
    @with_option_fields
    async def separate(self, request: Request,
                       audio_file: UploadFile = File(..., description=AUDIO_FILE_HELP),
                       **fields) -> Response:
        """The form's other fields are `SeparationOptions`' (`with_option_fields`)."""
        check_form_fields(request, await request.form())
        options = SeparationOptions.parse(**fields).with_model(
            self._default, self._settings.served_models)
        info = await self._ready_model(options.model)
        options.validate_for(info["sources"])
        data = await audio_file.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise UploadTooLargeError(f"the upload is larger than the limit of "
                                      f"{self._settings.max_upload_mb:g} MB")
        if not data:
            raise InvalidAudioError("the file is empty")
        song, archive, timing = await self._separate_song(data, options)
        name = PurePath(audio_file.filename or "song").stem or "song"
        return Response(archive, media_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="{_ascii(name)}_stems.zip"',
            "X-Audio-Seconds": f"{song.seconds:.3f}", "X-Windows": str(len(song.plan.windows)),
            "X-Model": options.model,
            "Server-Timing": timing})

    async def _separate_song(self, data: bytes, options: SeparationOptions):
        """Decode, then Encode (which runs the windows): `(song, zip, Server-Timing)`. An
        attempt that loses a replica or the song's mix starts again from the upload, until
        `retry_seconds` have passed."""
        geometry = await self._geometry(options.model)

        async def attempt():
            start = time.perf_counter()
            song = await self._decode.decode.remote(data, geometry, options)
            decoded = time.perf_counter()
            archive, stages = await self._encode.encode.remote(song, options)
            stages = {"decode": decoded - start, **stages,
                      "total": time.perf_counter() - start}
            return song, archive, ", ".join(f"{name};dur={seconds * 1000:.0f}"
                                            for name, seconds in stages.items())

        return await retrying(attempt, SONG_LOST, self._settings.retry_seconds,
                              "separation attempt lost; starting the song again",
                              delay=0.5, max_delay=0.5)

    async def _geometry(self, model: str):
        """The model's window geometry (what Decode plans with), asked of Separate once."""
        if model not in self._geometries:
            self._geometries[model] = await self._separate_for(model).geometry.remote(model)
        return self._geometries[model]


__all__ = ["Ingress", "app"]
