"""The middleware, innermost first: the upload cap and the replica's upload budget, API keys
and the per-client limit on separations, request counts, CORS. Each reads the replica's
settings from `replica.settings`."""
import re

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.formparsers import MultiPartParser

from .. import metrics
from ..access import bearer_token, matching_key
from ..engine import UploadTooLargeError
from ..signed_urls import SIGNED_PATH, SignatureError, signing_key
from .replica import settings as replica
from .errors import UploadCapExceeded, error, retry_later, too_large_detail

OPEN_PATHS = {"/", "/healthz", "/readyz", "/models", "/metrics", "/ui", "/docs",
              "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
UPLOAD_PATHS = ("/separate", "/jobs")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the other fields, beside the file
# An upload up to this size is parsed into memory instead of a temporary file on disk (it is
# read into memory right after anyway); Starlette's default is 1 MB, less than one song.
MultiPartParser.spool_max_size = 32 * 2**20


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class CappedBody:
    """Refuses an upload by its Content-Length before its body is read; without one (chunked
    uploads), counts the body bytes as they arrive and stops reading past the limit, so that
    no upload is spooled beyond it. An upload to /separate or /jobs also takes its size (the
    limit without a Content-Length) from the replica's `upload_budget` until it is answered:
    429 when that is spent. Pure ASGI and innermost: an exception raised in `receive` under
    Starlette's BaseHTTPMiddleware would reach FastAPI wrapped in an exception group."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = replica.max_upload_bytes
        if scope["type"] != "http" or not limit:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit + FORM_OVERHEAD:
            response = error(413, UploadTooLargeError.error, too_large_detail(limit))
            return await response(scope, receive, send)
        if scope["method"] != "POST" or scope["path"] not in UPLOAD_PATHS:
            return await self._capped(scope, receive, send, limit)
        budget, size = replica.upload_budget, int(length) if length.isdigit() else limit
        if not budget.try_take(size):
            response = retry_later("too_many_uploads", f"this replica holds its limit of "
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


def _signed_file(request: Request) -> bool:
    """A GET of a job's file with a signature in its query (`signed_urls`)."""
    return (request.method in ("GET", "HEAD") and "signature" in request.query_params
            and re.match(SIGNED_PATH, request.url.path) is not None)


async def access(request: Request, call_next):
    """API keys (when configured) on everything but health and docs, then the per-client limit
    on separations; both answered from the headers, before the upload is read."""
    keys = replica.api_keys
    if (request.url.path in OPEN_PATHS or request.url.path.startswith("/static/") or
            request.method == "OPTIONS" or keys is None):
        return await call_next(request)
    token, current = bearer_token(request.headers.get("authorization")), keys.current()
    key = matching_key(current, token)
    if keys.required and key is None and token is None and _signed_file(request):
        try:
            key = signing_key(request.url.path, request.query_params, current)
        except SignatureError as exc:
            return error(401, exc.error, exc.detail)
    if keys.required and key is None:
        response = error(401, "unauthorized", "send a valid API key as "
                         "'Authorization: Bearer <key>'")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    request.state.api_key = key  # jobs are visible to the key that created them
    limit = replica.limit
    if limit is None or request.url.path != "/separate":
        return await call_next(request)
    client = key or client_address(request)
    if not limit.try_enter(client):
        return retry_later("too_many_requests", f"at most {limit.limit} separations in "
                           f"flight per client")
    try:
        return await call_next(request)
    finally:
        limit.leave(client)


async def count_requests(request: Request, call_next):
    """Every answer counted by route template, method and status (`serve_graph_requests`)."""
    response = await call_next(request)
    route = request.scope.get("route")
    metrics.request_done(getattr(route, "path", "unmatched"), request.method,
                         response.status_code)
    return response


# What a web app of an allowed origin may send and read: DELETE cancels a job; Range and
# If-Range resume a download or seek; Idempotency-Key makes a job's POST safe to retry; and
# beyond the headers every page may read, the ones the API's answers carry for it
CORS_METHODS = ["GET", "HEAD", "POST", "DELETE"]
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Range", "If-Range"]
CORS_EXPOSED_HEADERS = ["Content-Disposition", "Content-Range", "Accept-Ranges", "ETag",
                        "Location", "Retry-After", "Idempotent-Replayed", "X-Audio-Seconds",
                        "X-Windows", "X-Model", "X-Cache", "Server-Timing"]


class ConfiguredCORS:
    """CORS for the origins in the replica's settings (none: no CORS headers at all)."""

    def __init__(self, app):
        self.app = app
        self._cors = None

    async def __call__(self, scope, receive, send):
        if not replica.cors_origins:
            return await self.app(scope, receive, send)
        if self._cors is None:
            self._cors = CORSMiddleware(self.app, allow_origins=list(replica.cors_origins),
                                        allow_methods=CORS_METHODS,
                                        allow_headers=CORS_REQUEST_HEADERS,
                                        expose_headers=CORS_EXPOSED_HEADERS)
        await self._cors(scope, receive, send)


def install(app: FastAPI) -> None:
    """Add the middleware to `app`, the first added innermost."""
    app.add_middleware(CappedBody)
    app.middleware("http")(access)
    app.middleware("http")(count_requests)
    app.add_middleware(ConfiguredCORS)  # outermost: browsers' preflights carry no key
