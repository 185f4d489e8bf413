"""`/jobs`: start a separation and answer at once, then its status, Server-Sent Events,
result and cancellation (`router`, and `JobMethods`, a mixin of `Ingress`; the queue and the
runs are `jobs.JobStore`'s and `job_runner.JobRunner`'s)."""
import asyncio
import json
import time
import typing as tp
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from .. import url_fetch
from ..engine import InvalidParameterError, SeparationOptions
from ..job_runner import StoredResult
from ..jobs import FINAL, STATUSES, with_links
from ..result_cache import content_digest
from ..signed_urls import SIGNED_FOR_S, signed
from ..webhooks import key_secret
from .byte_ranges import ranged_file
from .errors import ERROR_RESPONSES, JobNotDoneError, JobNotFoundError, documented
from .forms import AUDIO_FILE, AUDIO_URL, CALLBACK_URL, with_option_fields
from .middleware import client_address
from .replica import this_replica
from .separation import RESULT_RESPONSE, Answer, Song, request_key

router = APIRouter()

SSE_POLL_S, SSE_KEEPALIVE_S = 0.25, 15.
NO_JOB = documented("no such job (or expired)")
NOT_DONE = documented("the job has not finished, failed or was cancelled")
PART = {"description": "the byte range asked for (Content-Range)"}
NOT_SATISFIABLE = documented("the range starts at or beyond the end of the file")


class JobLinks(BaseModel):
    """A job: its state (`serve_graph.jobs.public`) and where to follow it."""
    id: str
    status: str = Field(description="queued, running, done, failed or cancelled")
    stage: str = Field(description="queued, decoding, separating, encoding, or the status")
    progress: dict = Field(description="windows_done, windows_total, fraction (0-1)")
    eta_seconds: tp.Optional[float] = Field(description="seconds left at the pace so far")
    model: tp.Optional[str]
    song: str = Field(description="the song's name: its file's (or URL path's) without the "
                      "folders and extension")
    audio_seconds: tp.Optional[float]
    created_at: float
    updated_at: float
    expires_at: tp.Optional[float] = Field(description="when a finished job is forgotten")
    error: tp.Optional[dict] = Field(description="a failed job's {status, error, detail}")
    callback: tp.Optional[dict] = Field(description="with a callback_url: {url, state (null "
                                        "until the job ends, then pending, delivered or "
                                        "failed), attempts: [{at, attempt, status or error, "
                                        "seconds}]}")
    status_url: str
    events_url: str
    result_url: str
    stems_url: str = Field(description="once done, the stems of its ZIP, each with a URL that "
                           "answers it alone (and byte ranges of it)")
    result_signed_url: tp.Optional[str] = Field(
        None, description=f"once done: result_url signed for this request's API key, answered "
        f"without it (an `<audio>` src, a link) for {SIGNED_FOR_S} s; without keys: result_url; "
        f"null before the job is done (not in callbacks: ask for the job)")


class JobList(BaseModel):
    """A page of this client's jobs, newest first."""
    jobs: tp.List[JobLinks]
    next_url: tp.Optional[str] = Field(description="the next page (older jobs), null on the "
                                       "last")


def signed_for(request: Request, path: str) -> str:
    """`path` signed for the request's API key (`signed_urls`); as it is without keys."""
    api_key = getattr(request.state, "api_key", None)
    return path if api_key is None else signed(path, api_key)


def job_links(request: Request, job: dict) -> dict:
    """`job`'s public view with the URLs to follow it (`jobs.with_links`); once done, its
    result's URL signed for `request`'s key too."""
    view = with_links(job)
    view["result_signed_url"] = (signed_for(request, view["result_url"])
                                 if job["status"] == "done" else None)
    return view


IDEMPOTENCY_KEY = Header(
    None, alias="Idempotency-Key", min_length=1, max_length=255, pattern="^[!-~]+$",
    description="A key of the client's choosing (a UUID), 1-255 visible ASCII characters: "
    "the request sent again with the same key (a retry after a lost answer) gets the job "
    "the first one created, 202 with `Idempotent-Replayed: true`, not a second job, for as "
    "long as that job is kept; the same key with another song, options or callback is "
    "refused, 422 idempotency_key_reused")


def idempotency_of(key: tp.Optional[str], song: Song,
                   callback: tp.Optional[dict]) -> tp.Optional[dict]:
    """`{"key", "fingerprint"}` of a job request with an `Idempotency-Key` (None without
    one): the fingerprint hashes what the job is made of, the song's bytes and name, its
    options and its callback URL."""
    if key is None:
        return None
    return {"key": key, "fingerprint": content_digest(song.data, {
        "name": song.name, "options": song.options.model_dump(),
        "callback_url": callback and callback["url"]})}


def found(job: tp.Optional[dict], job_id: str) -> dict:
    """The store's answer about `job_id`, or 404 when it had none for this client."""
    if job is None:
        raise JobNotFoundError(f"no job {job_id} (unknown, expired or not yours)")
    return job


def request_client(request: Request) -> str:
    """Who the job limits count a request against: its key, or its address without keys."""
    key = request_key(request)
    if key is not None:
        return f"key:{key}"
    return f"address:{client_address(request)}"


class JobMethods:
    """What the job routes ask of an Ingress replica (a mixin of `Ingress`). Needs `_jobs`
    (the store's handle), `_runner` (`JobRunner`), `_settings`, `_decode`, and `song_in`,
    `separated` (`separation.Separations`), `ready_model` and `model_info`
    (`health.ModelStates`)."""

    async def job(self, request: Request, job_id: str) -> dict:
        """The store's record of `job_id` for this request's key, or `JobNotFoundError`."""
        self._runner.watch()
        return found(await self._jobs.get.remote(job_id, request_key(request)), job_id)

    async def finished_result(self, request: Request, job_id: str) -> StoredResult:
        """Job `job_id`'s stored result, for this request's key; `JobNotFoundError`, or
        `JobNotDoneError` before it is done."""
        job = await self.job(request, job_id)
        if job["status"] != "done":
            raise JobNotDoneError(job)
        stored = await self._runner.result(job_id, request_key(request))
        if stored is None:
            raise JobNotFoundError(f"job {job_id} has no result any more")
        return stored

    async def events(self, request: Request, job: dict):
        """One `status` event per change of `job`, comments to keep the line open while it
        does not change, until it ends (or is forgotten)."""
        last, quiet_since, key = None, time.monotonic(), request_key(request)
        current: tp.Optional[dict] = job
        while current is not None:
            view = job_links(request, current)
            if view != last:
                yield f"event: status\ndata: {json.dumps(view)}\n\n"
                last, quiet_since = view, time.monotonic()
                if current["status"] in FINAL:
                    return
            elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(SSE_POLL_S)
            current = await self._jobs.get.remote(job["id"], key)

    async def run_for_job(self, data: bytes, options: SeparationOptions, name: str,
                          job_id: str, scope: tp.Optional[str]) -> Answer:
        """One job's separation (`JobRunner`): its ZIP, the headers /separate would send
        (from the result cache, for `scope`, when it holds them) and the cache's entry."""
        song = Song(options, data, name, await self.ready_model(options.model))
        return await self.separated(song, scope, job_id)

    async def can_start_jobs(self) -> bool:
        """Whether this replica's runner may claim queued jobs: once Separate answers for the
        default model (loaded, or missing, which fails the job with its reason)."""
        return (await self.model_info(self._default))["state"] != "loading"

    async def callback_for(self, request: Request, url: tp.Optional[str]
                           ) -> tp.Optional[dict]:
        """The job's callback, `{"url", "secret"}` (None: the configured secret), its URL
        checked now like a song's; None without a URL."""
        if url is None:
            return None
        await asyncio.to_thread(url_fetch.checked_addresses, url,
                                self._settings.allowed_networks)
        api_key = getattr(request.state, "api_key", None)
        if api_key is not None:
            return {"url": url, "secret": key_secret(api_key)}
        if self._settings.webhook_secret is None:
            raise InvalidParameterError("callbacks are signed, and this service has no secret "
                                        "to sign them with: its operator sets webhook_secret, "
                                        "or API keys")
        return {"url": url, "secret": None}



@router.post("/jobs", summary="Start a separation job: 202 at once, then poll status_url, "
             "follow events_url (Server-Sent Events) and fetch result_url",
             status_code=202, response_model=JobLinks, responses=ERROR_RESPONSES)
@with_option_fields
async def create_job(request: Request, audio_file: tp.Optional[UploadFile] = AUDIO_FILE,
                     audio_url: tp.Optional[str] = AUDIO_URL,
                     callback_url: tp.Optional[str] = CALLBACK_URL,
                     idempotency_key: tp.Optional[str] = IDEMPOTENCY_KEY,
                     ingress: JobMethods = Depends(this_replica), **fields) -> JSONResponse:
    """The same fields as `POST /separate`, checked the same way before the 202, and a
    `callback_url`. The song's headers are read before the 202 too (`engine.probe`): a file
    that is not audio, or states a length over the limit, is refused at once; what only its
    decoding shows (a truncated file) fails the job. With an `Idempotency-Key`, a request
    sent again gets the job the first one created."""
    callback = await ingress.callback_for(request, callback_url)
    async with ingress.song_in(request, audio_file, audio_url, fields) as song:
        await ingress._decode.probe.remote(song.data)  # not audio, or too long: refused now
        idempotency = await asyncio.to_thread(idempotency_of, idempotency_key, song, callback)
        job, replayed = await ingress._runner.submit(
            request_key(request), request_client(request), song.data, song.options,
            song.name, callback, idempotency)
    links = job_links(request, job)
    headers = {"Location": links["status_url"]}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(links, status_code=202, headers=headers)


@router.get("/jobs", summary="This client's jobs (its API key's; its address's without "
            "keys), newest first, a page at a time", response_model=JobList)
async def list_jobs(request: Request,
                    status: tp.Optional[tp.Literal[STATUSES]] = Query(
                        None, description="only the jobs of this status"),
                    limit: int = Query(20, ge=1, le=100, description="jobs in a page"),
                    before: tp.Optional[float] = Query(
                        None, gt=0, description="only jobs created before this time (Unix "
                        "seconds): the `created_at` of the last job of the page before"),
                    ingress: JobMethods = Depends(this_replica)) -> dict:
    page = await ingress._jobs.listed.remote(request_client(request), status, limit, before)
    jobs = [job_links(request, job) for job in page["jobs"]]
    following = {"limit": limit, "before": repr(jobs[-1]["created_at"]) if jobs else None,
                 **({"status": status} if status else {})}
    return {"jobs": jobs, "next_url": f"/jobs?{urlencode(following)}" if page["more"] else None}


@router.get("/jobs/{job_id}", summary="A job's status, stage, progress and ETA",
            response_model=JobLinks, responses={404: NO_JOB})
async def job_status(request: Request, job_id: str,
                     ingress: JobMethods = Depends(this_replica)) -> dict:
    return job_links(request, await ingress.job(request, job_id))


@router.get("/jobs/{job_id}/events", summary="A job's status as Server-Sent Events, one "
            "`status` event per change, until it ends",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 404: NO_JOB})
async def job_events(request: Request, job_id: str,
                     ingress: JobMethods = Depends(this_replica)) -> StreamingResponse:
    job = await ingress.job(request, job_id)
    return StreamingResponse(ingress.events(request, job),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.head("/jobs/{job_id}/result", include_in_schema=False)
@router.get("/jobs/{job_id}/result", summary="A finished job's ZIP of stems (or its remix), "
            "whole or the byte range a `Range` header asks for (206): a download resumed",
            response_class=Response,
            responses={200: RESULT_RESPONSE, 206: PART, 404: NO_JOB, 409: NOT_DONE,
                       416: NOT_SATISFIABLE})
async def job_result(request: Request, job_id: str,
                     ingress: JobMethods = Depends(this_replica)) -> Response:
    stored = await ingress.finished_result(request, job_id)
    headers = dict(stored.headers)
    return ranged_file(request, stored.file, stored.size, f'"{job_id}"',  # it never changes
                       headers.pop("Content-Type", "application/zip"), headers)


@router.delete("/jobs/{job_id}", summary="Cancel a job (its queued windows and encoding "
               "stop), or forget one that has ended now: its result is deleted and it answers "
               "404 from then on (`expires_at`: now)",
               response_model=JobLinks, responses={404: NO_JOB})
async def cancel_job(request: Request, job_id: str,
                     ingress: JobMethods = Depends(this_replica)) -> dict:
    job = found(await ingress._jobs.cancel.remote(job_id, request_key(request)), job_id)
    ingress._runner.cancel(job_id)
    return job_links(request, job)
