"""The HTTP front: FastAPI on Ray Serve. `POST /separate` and `GET /`, the original API."""
import asyncio
import inspect
import itertools
import json
import logging
import time
import types
import typing as tp
import uuid
from collections import Counter
from http import HTTPStatus
from pathlib import Path, PurePath

import fastapi_offline

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import (FileResponse, HTMLResponse, JSONResponse, PlainTextResponse,
                               Response, StreamingResponse)
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from ray.serve.handle import DeploymentHandle

from .access import ByteBudget, ConcurrencyLimit, bearer_token, load_keys, matching_key
from .engine import (InvalidAudioError, InvalidParameterError, ModelMissingError,
                     ModelUnavailableError, SeparationError, SeparationOptions,
                     UploadTooLargeError)
from .engine.options import EXCLUSIVE_FIELDS, MEDIA_TYPES, request_fields
from .job_runner import JobRunner, chunks
from .jobs import FINAL, job_store, key_id
from .launch import keep_replica_server_on_loopback, log_replica_ready
from . import metrics
from .messages import SONG_LOST, ModelHandles, awaited, retrying
from .settings import ServiceSettings

logger = logging.getLogger("ray.serve")
HEALTH_WAIT_S = 2.  # how long GET / waits for a Separate replica before saying "loading"

app = FastAPI(
    title="Stem separation",
    description="Upload a song, get its stems (vocals, drums, bass, other...) back as a ZIP, "
                "separated by Demucs v4 (htdemucs, or another model: GET /models).",
    version="1.0", docs_url=None, redoc_url=None)  # /docs and /redoc below: no CDN

UI_PAGE = Path(__file__).with_name("static") / "ui.html"
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")  # Swagger UI 5, ReDoc
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@app.get("/ui", include_in_schema=False)
async def web_page() -> HTMLResponse:
    """The web page: drop a song, follow the job, listen to the stems."""
    return HTMLResponse(UI_PAGE.read_text())


@app.get("/static/{name}", include_in_schema=False)
async def docs_asset(name: str) -> Response:
    """Swagger UI's and ReDoc's files, served here so that /docs works offline."""
    path = DOCS_ASSETS / name
    if PurePath(name).name != name or path.suffix not in ASSET_TYPES or not path.is_file():
        return _error(404, "not_found", f"no asset {name!r}")
    return FileResponse(path, media_type=ASSET_TYPES[path.suffix],
                        headers={"Cache-Control": "public, max-age=86400"})


@app.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs",
                               swagger_js_url="/static/swagger-ui-bundle.js",
                               swagger_css_url="/static/swagger-ui.css",
                               swagger_favicon_url="/static/favicon.png")


@app.get("/redoc", include_in_schema=False)
async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                          redoc_js_url="/static/redoc.standalone.js",
                          redoc_favicon_url="/static/favicon.png", with_google_fonts=False)


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
    429: _documented("too many separations in flight for this client, jobs queued (in all or "
                     "for this client) or uploads in flight; Retry-After says when to retry"),
    503: _documented("the model is loading or missing"),
    507: _documented("the job storage is full (max_job_storage_mb)"),
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


def openapi_document(models: tp.Sequence[str] = ()) -> dict:
    """FastAPI's schema, with `additionalProperties: false` on the form bodies (the routes
    refuse fields they do not take, `check_form_fields`) and the options that exclude each
    other (`EXCLUSIVE_FIELDS`) marked so; `model` lists `models`, those the service serves
    (any name when empty)."""
    schema = _generated_openapi()
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        if name.startswith("Body_"):
            component["additionalProperties"] = False
            if "model" in component.get("properties", {}) and models:
                component["properties"]["model"]["enum"] = list(models)
            if set(EXCLUSIVE_FIELDS) <= set(component.get("properties", {})):
                component["not"] = {"anyOf": _conflicts()}
    return schema


def _conflicts() -> tp.List[dict]:
    """The option combinations refused (422), as schemas: two of the stem choices, or one of
    them with `format=stems` (which holds every stem)."""
    pairs = [{"required": list(pair)} for pair in itertools.combinations(EXCLUSIVE_FIELDS, 2)]
    return pairs + [{"required": ["format", name], "properties": {"format": {"const": "stems"}}}
                    for name in EXCLUSIVE_FIELDS]


def _openapi_with_closed_forms() -> dict:
    """The served schema: `openapi_document` for this replica's models."""
    return openapi_document(_config.models)


app.openapi = _openapi_with_closed_forms  # type: ignore[method-assign]


def _error(status: int, error: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


def _retry_later(error: str, detail: str) -> JSONResponse:
    """429 `error` with `Retry-After: RETRY_AFTER_S`."""
    response = _error(429, error, f"{detail}; retry after {RETRY_AFTER_S} s")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


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
    # FastAPI reads an empty form value as the field left out: for a field with a default
    # (shifts, wav_depth...) that would take the default in silence, against the schema
    blank = sorted(name for name, value in form.multi_items()
                   if value == "" and name in _DEFAULTED_FIELDS)
    if blank:
        raise InvalidParameterError(f"field(s) {', '.join(map(repr, blank))} sent empty: give "
                                    f"a value or leave the field out")


_DEFAULTED_FIELDS = {field.name for field in request_fields() if field.default is not None}


@app.exception_handler(SeparationError)
async def _separation_error(request: Request, exc: SeparationError) -> JSONResponse:
    response = _error(exc.status_code, exc.error, exc.detail)
    response.headers.update(getattr(exc, "headers", None) or {})  # Retry-After of a 429
    return response


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors FastAPI/Starlette raise themselves (malformed multipart, unknown route, wrong
    method), in the service's `{"error", "detail"}` shape."""
    if isinstance(exc, UploadCapExceeded):
        return _error(413, UploadTooLargeError.error, str(exc.detail))
    name = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    response = _error(exc.status_code, name, str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. `Allow` on a 405
    if exc.status_code == 405:  # Starlette names the first route's methods only
        response.headers["Allow"] = _allowed_methods(request)
    return response


def _allowed_methods(request: Request) -> str:
    """Every method the routes of this path take (`/jobs/{id}`: GET and DELETE)."""
    path = request.url.path
    router = request.scope.get("router") or request.app.router
    methods = {method for route in router.routes
               if getattr(route, "path_regex", None) and route.path_regex.match(path)
               for method in getattr(route, "methods", None) or ()}
    return ", ".join(sorted(methods))


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
                                cors_origins=(), models=(), upload_budget=ByteBudget(0))



def configure_middleware(settings: ServiceSettings) -> None:
    """Set `_config` from the replica's settings. A module function, so that the call from
    `Ingress.__init__` (whose class Serve pickles by value, copying the globals it names)
    reaches this module's `_config` in the replica."""
    _config.max_upload_bytes = settings.max_upload_bytes
    _config.api_keys = load_keys(settings.api_keys_file)
    _config.limit = ConcurrencyLimit(settings.max_concurrent_per_client)
    _config.cors_origins = settings.cors_origins
    _config.models = settings.served_models
    _config.upload_budget = ByteBudget(int(settings.max_upload_memory_mb * 2**20))


OPEN_PATHS = {"/", "/healthz", "/readyz", "/models", "/metrics", "/ui", "/docs",
              "/docs/oauth2-redirect", "/openapi.json",
              "/redoc"}
RETRY_AFTER_S = 5


FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the other fields, beside the file
# An upload up to this size is parsed into memory instead of a temporary file on disk (it is
# read into memory right after anyway); Starlette's default is 1 MB, less than one song.
MultiPartParser.spool_max_size = 32 * 2**20


def _too_large_detail(limit: int) -> str:
    return f"the upload is larger than the limit of {limit / 2**20:g} MB"


class UploadCapExceeded(HTTPException):
    """Raised while the body is read, once more than the limit has arrived: chunked uploads
    carry no Content-Length to refuse them by."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_detail(limit))


UPLOAD_PATHS = ("/separate", "/jobs")


class _CappedBody:
    """Refuses an upload by its Content-Length before its body is read; without one (chunked
    uploads), counts the body bytes as they arrive and stops reading past the limit, so that
    no upload is spooled beyond it. An upload to /separate or /jobs also takes its size (the
    limit without a Content-Length) from the replica's `upload_budget` until it is answered:
    429 when that is spent. Pure ASGI and innermost: an exception raised in `receive` under
    Starlette's BaseHTTPMiddleware would reach FastAPI wrapped in an exception group."""

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
        if scope["method"] != "POST" or scope["path"] not in UPLOAD_PATHS:
            return await self._capped(scope, receive, send, limit)
        budget, size = _config.upload_budget, int(length) if length.isdigit() else limit
        if not budget.try_take(size):
            response = _retry_later("too_many_uploads", f"this replica holds its limit of "
                                    f"{budget.limit / 2**20:g} MB of uploads in flight "
                                    f"(max_upload_memory_mb)")
            return await response(scope, receive, send)
        try:
            await self._capped(scope, receive, send, limit)
        finally:
            budget.give_back(size)

    async def _capped(self, scope, receive, send, limit: int):
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
    if (request.url.path in OPEN_PATHS or request.url.path.startswith("/static/") or
            request.method == "OPTIONS"):
        return await call_next(request)
    key = matching_key(keys, bearer_token(request.headers.get("authorization")))
    if keys and key is None:
        response = _error(401, "unauthorized", "send a valid API key as "
                          "'Authorization: Bearer <key>'")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    request.state.api_key = key  # jobs are visible to the key that created them
    limit = _config.limit
    if limit is None or request.url.path != "/separate":
        return await call_next(request)
    client = key or _address(request)
    if not limit.try_enter(client):
        return _retry_later("too_many_requests", f"at most {limit.limit} separations in "
                            f"flight per client")
    try:
        return await call_next(request)
    finally:
        limit.leave(client)


@app.middleware("http")
async def _count_requests(request: Request, call_next):
    """Every answer counted by route template, method and status (`serve_graph_requests`)."""
    response = await call_next(request)
    route = request.scope.get("route")
    metrics.request_done(getattr(route, "path", "unmatched"), request.method,
                         response.status_code)
    return response


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


SSE_POLL_S, SSE_KEEPALIVE_S, WATCH_S = 0.25, 15., 1.


class JobNotFoundError(SeparationError):
    status_code = 404
    error = "job_not_found"


class JobLinks(BaseModel):
    """A job: its state (`serve_graph.jobs.public`) and where to follow it."""
    id: str
    status: str = Field(description="queued, running, done, failed or cancelled")
    stage: str = Field(description="queued, decoding, separating, encoding, or the status")
    progress: dict = Field(description="windows_done, windows_total, fraction (0-1)")
    eta_seconds: tp.Optional[float] = Field(description="seconds left at the pace so far")
    model: tp.Optional[str]
    audio_seconds: tp.Optional[float]
    created_at: float
    updated_at: float
    expires_at: tp.Optional[float] = Field(description="when a finished job is forgotten")
    error: tp.Optional[dict] = Field(description="a failed job's {status, error, detail}")
    status_url: str
    events_url: str
    result_url: str


def _job_links(job: dict) -> dict:
    base = f"/jobs/{job['id']}"
    return {**job, "status_url": base, "events_url": f"{base}/events",
            "result_url": f"{base}/result"}


def _found(job: tp.Optional[dict], job_id: str) -> dict:
    """The store's answer about `job_id`, or 404 when it had none for this client."""
    if job is None:
        raise JobNotFoundError(f"no job {job_id} (unknown, expired or not yours)")
    return job


def _key(request: Request) -> tp.Optional[str]:
    return key_id(getattr(request.state, "api_key", None))


def _client(request: Request) -> str:
    """Who the job limits count a request against: its key, or its address without keys."""
    key = _key(request)
    if key is not None:
        return f"key:{key}"
    return f"address:{_address(request)}"


RESULT_RESPONSE = {"content": {"application/zip": {}, **{media: {} for media in
                                                          dict.fromkeys(MEDIA_TYPES.values())}},
                   "description": "ZIP of the stems; with `remix`, the mixed audio file; "
                                  "with `format=stems`, the NI STEMS file"}


def _result_headers(name: str, song, options: SeparationOptions, timing: str) -> dict:
    """The answer's headers: its type and file name (a ZIP of stems, a remix's file or a STEMS
    file), the song's facts and the timing."""
    return {"Content-Type": options.result_media_type,
            "Content-Disposition": f'attachment; filename="{options.result_name(_ascii(name))}"',
            "X-Audio-Seconds": f"{song.seconds:.3f}", "X-Windows": str(len(song.plan.windows)),
            "X-Model": options.model or "", "Server-Timing": timing}


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
        self._for_model = ModelHandles(separate)  # Separate, routed by model
        self._max_bytes = settings.max_upload_bytes
        self._jobs = job_store(settings.job_ttl_s, settings.job_storage, settings.job_limits)
        self._runner = JobRunner(self._jobs, uuid.uuid4().hex, settings.jobs_per_replica,
                                 self._run_for_job)
        configure_middleware(settings)
        log_replica_ready(logger)

    async def _model_info(self, model: str, load: bool = True) -> dict:
        """Separate's word on `model`: "loaded" (cached from then on), "available" (weights
        there, not loaded; only with `load` false), "missing" with the reason, or "loading"
        while no Separate replica answers within `HEALTH_WAIT_S`."""
        if model in self._infos:
            return self._infos[model]
        call = (self._for_model[model].info.remote(model) if load else
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
                info = await self._for_model[model].info.remote(model)
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

    @app.get("/metrics", summary="Prometheus metrics: Ray Serve's, Ray's (GPU utilisation where "
             "present) and the service's (serve_graph_*), from this node's Ray metrics agent",
             response_class=PlainTextResponse)
    async def prometheus_metrics(self) -> PlainTextResponse:
        text = await asyncio.to_thread(metrics.node_metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/stats", summary="Batching counters and model seconds of the Separate deployment "
             "(one replica), and the object store's use")
    async def stats(self) -> dict:
        stats = await self._separate.stats.remote()
        stats["object_store"] = await asyncio.to_thread(object_store_usage)
        return stats

    @app.post("/separate", summary="Separate a song into stems, returned as a ZIP (with "
              "remix: the stems mixed, as one audio file)",
              response_class=Response,
              responses={200: RESULT_RESPONSE, **ERROR_RESPONSES})
    @with_option_fields
    async def separate(self, request: Request,
                       audio_file: UploadFile = File(..., description=AUDIO_FILE_HELP),
                       **fields) -> Response:
        """The form's other fields are `SeparationOptions`' (`with_option_fields`)."""
        options, data, name = await self._accept(request, audio_file, fields)
        song, archive, timing = await self._separate_song(data, options)
        headers = _result_headers(name, song, options, timing)
        return Response(archive, media_type=headers.pop("Content-Type"), headers=headers)

    async def _accept(self, request: Request, audio_file: UploadFile, fields: dict
                      ) -> tp.Tuple[SeparationOptions, bytes, str]:
        """A separation request checked before any work: its fields, its model (loaded) and
        the model's stems, the upload's size. Returns the options (model set), the upload
        and the song's name."""
        check_form_fields(request, await request.form())
        options = SeparationOptions.parse(**fields).with_model(
            self._default, self._settings.served_models).with_defaults(
            mp3_quality=self._settings.mp3_quality)
        info = await self._ready_model(options.model)
        options.validate_for(info["sources"])
        data = await audio_file.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise UploadTooLargeError(f"the upload is larger than the limit of "
                                      f"{self._settings.max_upload_mb:g} MB")
        if not data:
            raise InvalidAudioError("the file is empty")
        return options, data, PurePath(audio_file.filename or "song").stem or "song"

    @app.post("/jobs", summary="Start a separation job: 202 at once, then poll status_url, "
              "follow events_url (Server-Sent Events) and fetch result_url",
              status_code=202, response_model=JobLinks, responses=ERROR_RESPONSES)
    @with_option_fields
    async def create_job(self, request: Request,
                         audio_file: UploadFile = File(..., description=AUDIO_FILE_HELP),
                         **fields) -> JSONResponse:
        """The same fields as `POST /separate`, checked the same way before the 202."""
        options, data, name = await self._accept(request, audio_file, fields)
        job = await self._runner.submit(_key(request), _client(request), data, options, name)
        links = _job_links(job)
        return JSONResponse(links, status_code=202, headers={"Location": links["status_url"]})

    @app.get("/jobs/{job_id}", summary="A job's status, stage, progress and ETA",
             response_model=JobLinks, responses={404: _documented("no such job (or expired)")})
    async def job_status(self, request: Request, job_id: str) -> dict:
        return _job_links(await self._job(request, job_id))

    @app.get("/jobs/{job_id}/events", summary="A job's status as Server-Sent Events, one "
             "`status` event per change, until it ends",
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}},
                        404: _documented("no such job (or expired)")})
    async def job_events(self, request: Request, job_id: str) -> StreamingResponse:
        job = await self._job(request, job_id)
        key = _key(request)

        async def events():
            last, quiet_since = None, time.monotonic()
            current: tp.Optional[dict] = job
            while current is not None:
                view = _job_links(current)
                if view != last:
                    yield f"event: status\ndata: {json.dumps(view)}\n\n"
                    last, quiet_since = view, time.monotonic()
                    if current["status"] in FINAL:
                        return
                elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(SSE_POLL_S)
                current = await self._jobs.get.remote(job_id, key)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/jobs/{job_id}/result", summary="A finished job's ZIP of stems (or its remix)",
             response_class=Response,
             responses={200: RESULT_RESPONSE,
                        404: _documented("no such job (or expired)"),
                        409: _documented("the job has not finished, failed or was cancelled")})
    async def job_result(self, request: Request, job_id: str) -> Response:
        job = await self._job(request, job_id)
        if job["status"] != "done":
            detail = f"the job is {job['status']}"
            if job["error"]:
                detail += f": {job['error']['detail']}"
            return _error(409, "job_not_done", detail, job_status=job["status"])
        found = await self._runner.result(job_id, _key(request))
        if found is None:
            raise JobNotFoundError(f"job {job_id} has no result any more")
        file, size, headers = found
        headers = dict(headers)
        return StreamingResponse(chunks(file),
                                 media_type=headers.pop("Content-Type", "application/zip"),
                                 headers={**headers, "Content-Length": str(size)})

    @app.delete("/jobs/{job_id}", summary="Cancel a job (its queued windows and encoding stop)",
                response_model=JobLinks,
                responses={404: _documented("no such job (or expired)")})
    async def cancel_job(self, request: Request, job_id: str) -> dict:
        job = _found(await self._jobs.cancel.remote(job_id, _key(request)), job_id)
        self._runner.cancel(job_id)
        return _job_links(job)

    async def _job(self, request: Request, job_id: str) -> dict:
        self._runner.watch()
        return _found(await self._jobs.get.remote(job_id, _key(request)), job_id)

    async def _run_for_job(self, data: bytes, options: SeparationOptions, name: str,
                           job_id: str) -> tp.Tuple[bytes, dict]:
        """One job's separation (`JobRunner`): its ZIP and the headers /separate would send."""
        song, archive, timing = await self._separate_song(data, options, job_id)
        return archive, _result_headers(name, song, options, timing)

    async def check_health(self) -> None:
        """Serve's periodic health check: also what starts the job runner of a replica that
        has had no request yet (one that replaced a dead replica takes the queued jobs)."""
        self._runner.watch()

    async def _separate_song(self, data: bytes, options: SeparationOptions,
                             job_id: tp.Optional[str] = None):
        """Decode, then Encode (which runs the windows): `(song, zip, Server-Timing)`. An
        attempt that loses a replica or the song's mix starts again from the upload, until
        `retry_seconds` have passed. Stages are reported to job `job_id`, if any."""
        geometry = await self._geometry(options.model)

        def stage(**fields) -> None:
            if job_id is not None:
                self._jobs.update.remote(job_id, **fields)

        async def attempt():
            start = time.perf_counter()
            stage(stage="decoding")
            song = await awaited(self._decode.decode.remote(data, geometry, options))
            decoded = time.perf_counter()
            stage(stage="separating", windows_total=len(song.plan.windows),
                  audio_seconds=round(song.seconds, 3))
            zipped, stages = await awaited(
                self._encode.encode.remote(song, options, job_id))
            archive = zipped.tobytes()  # read from the object store
            stages = {"decode": decoded - start, **stages,
                      "total": time.perf_counter() - start}
            metrics.song_done(options.model, song.seconds, stages)
            return song, archive, ", ".join(f"{name};dur={seconds * 1000:.0f}"
                                            for name, seconds in stages.items())

        return await retrying(attempt, SONG_LOST, self._settings.retry_seconds,
                              "separation attempt lost; starting the song again",
                              delay=0.5, max_delay=0.5)

    async def _geometry(self, model: str):
        """The model's window geometry (what Decode plans with), asked of Separate once."""
        if model not in self._geometries:
            self._geometries[model] = await self._for_model[model].geometry.remote(model)
        return self._geometries[model]


__all__ = ["Ingress", "app"]
