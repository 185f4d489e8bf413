"""Every error's body `{"error", "detail"}`, what the OpenAPI document says of them, and the
exception handlers that give every failure that shape (a typed `SeparationError` its own
status; Starlette's own errors their phrase; anything else a logged 500 with a request id)."""
import logging
import typing as tp
import uuid
from http import HTTPStatus

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import SeparationError, UploadTooLargeError

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 5


class ErrorBody(BaseModel):
    """Every error's body."""
    error: str = Field(description="a stable code, e.g. invalid_audio")
    detail: str = Field(description="what was wrong, for a person")


def documented(description: str) -> dict:
    """An OpenAPI `responses` entry with the error body."""
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: tp.Dict[tp.Union[int, str], dict] = {
    400: documented("malformed request (multipart)"),
    401: documented("API keys are configured and none valid was sent"),
    404: documented("the model asked for is served here but its weights are missing"),
    413: documented("upload or audio too long, or over the window budget"),
    415: documented("not decodable audio"),
    422: documented("invalid parameter, or an audio_url / callback_url refused (scheme, "
                    "address, redirect, or not reachable)"),
    429: documented("too many separations in flight for this client, jobs queued (in all or "
                    "for this client) or uploads in flight; Retry-After says when to retry"),
    503: documented("the model is loading or missing"),
    507: documented("the job storage is full (max_job_storage_mb)"),
}


class JobNotFoundError(SeparationError):
    status_code = 404
    error = "job_not_found"


class JobNotDoneError(SeparationError):
    """A job's result asked for before it is done; the body says its status (`job_status`)."""
    status_code = 409
    error = "job_not_done"

    def __init__(self, job: dict):
        detail = f"the job is {job['status']}"
        if job["error"]:
            detail += f": {job['error']['detail']}"
        super().__init__(detail)
        self.extra = {"job_status": job["status"]}


class StemNotFoundError(SeparationError):
    status_code = 404
    error = "stem_not_found"


def error(status: int, code: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


def retry_later(code: str, detail: str) -> JSONResponse:
    """429 `code` with `Retry-After: RETRY_AFTER_S`."""
    response = error(429, code, f"{detail}; retry after {RETRY_AFTER_S} s")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def too_large_detail(limit: int) -> str:
    return f"the upload is larger than the limit of {limit / 2**20:g} MB"


class UploadCapExceeded(HTTPException):
    """Raised while the body is read, once more than the limit has arrived: chunked uploads
    carry no Content-Length to refuse them by."""

    def __init__(self, limit: int):
        super().__init__(413, too_large_detail(limit))


async def _separation_error(request: Request, exc: SeparationError) -> JSONResponse:
    response = error(exc.status_code, exc.error, exc.detail, **getattr(exc, "extra", {}))
    response.headers.update(getattr(exc, "headers", None) or {})  # Retry-After of a 429
    return response


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors FastAPI/Starlette raise themselves (malformed multipart, unknown route, wrong
    method), in the service's `{"error", "detail"}` shape."""
    if isinstance(exc, UploadCapExceeded):
        return error(413, UploadTooLargeError.error, str(exc.detail))
    name = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    response = error(exc.status_code, name, str(exc.detail))
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


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                         for e in exc.errors())
    return error(422, "invalid_parameter", problems)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    cause = getattr(exc, "cause", None)  # a RayTaskError from another deployment
    if isinstance(cause, SeparationError):
        return error(cause.status_code, cause.error, cause.detail)
    request_id = uuid.uuid4().hex
    logger.exception("request %s failed", request_id)
    return error(500, "internal_error", "the separation failed; the error is logged",
                 request_id=request_id)


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(SeparationError, _separation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
