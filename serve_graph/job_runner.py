"""The jobs side of an Ingress replica: takes uploads into the job storage and the queue, runs
its share of the queued jobs (at most `jobs_per_replica` at once), and streams results back.

The queue is the `JobStore`'s: a job waits there as a record, its upload on the storage, not in
this replica's memory. Every `WATCH_S` (and at once when a job is queued here) the replica tells
the store which jobs it runs, stops those cancelled elsewhere, and claims queued ones for its
free slots; a job it runs reads its upload from the storage, and its ZIP goes back there.
"""
import asyncio
import contextvars
import logging
import typing as tp
import uuid

from .engine import SeparationError, SeparationOptions
from .job_files import JobFiles

logger = logging.getLogger("ray.serve")
WATCH_S = 1.  # how often a replica reports to the store and claims queued jobs

# `run(data, options, name, job_id, key) -> (zip bytes, response headers, cache entry)`: one
# separation (`api.separation.Answer`; the entry `{"key", "dir"}` of the result cache, or None)
Run = tp.Callable[[bytes, SeparationOptions, str, str, tp.Optional[str]],
                  tp.Awaitable[tp.Tuple[bytes, dict, tp.Optional[dict]]]]
# `ready() -> bool`: whether jobs can start now (false while the model's replica starts)
Ready = tp.Callable[[], tp.Awaitable[bool]]


class StoredResult(tp.NamedTuple):
    """A finished job's result on the job storage: its `file` (open: the reader closes it),
    `size` in bytes, the `headers` /separate would have sent with it, and the `song`'s name."""
    file: tp.BinaryIO
    size: int
    headers: dict
    song: str


class JobRefusedError(SeparationError):
    """A job over one of the limits (`jobs.JobLimits`): 429 with Retry-After, or 507."""

    def __init__(self, refused: dict):
        super().__init__(refused["detail"])
        self.status_code, self.error = refused["status"], refused["error"]
        self.headers = {"Retry-After": str(refused["retry_after"])}


class IdempotencyKeyReusedError(SeparationError):
    """An `Idempotency-Key` this client used for another request (`JobStore.replay`)."""
    status_code = 422
    error = "idempotency_key_reused"


class JobStorageError(SeparationError):
    """This replica does not see the job storage the store writes to (a local folder on a
    cluster: configure `job_storage` as shared storage)."""
    status_code = 503
    error = "job_storage_unavailable"


class JobRunner:
    """Jobs for one Ingress replica (`owner`), run with `run`, at most `slots` at once, none
    claimed while `ready` says no: a service restarted on a storage with queued jobs leaves
    them queued until its model is up, instead of failing them with the 503 of a request."""

    def __init__(self, store, owner: str, slots: int, run: Run, ready: Ready):
        self.store, self.owner, self.slots, self._run = store, owner, max(1, slots), run
        self._ready = ready
        self.running: tp.Dict[str, asyncio.Task] = {}
        self._files: tp.Optional[JobFiles] = None
        self._watcher: tp.Optional[asyncio.Task] = None
        self._poke = asyncio.Event()

    async def files(self) -> JobFiles:
        """The job storage, as the store names it, checked to be the store's own."""
        if self._files is None:
            where = await self.store.storage.remote()
            files = await asyncio.to_thread(JobFiles, where["url"])
            if not await asyncio.to_thread(files.shared_with, where["store"]):
                raise JobStorageError(f"this replica does not see the job storage "
                                      f"{where['url']!r} that the job store writes to: on "
                                      f"a cluster, set job_storage to shared storage")
            self._files = files
        return self._files

    async def submit(self, key: tp.Optional[str], client: str, data: bytes,
                     options: SeparationOptions, name: str,
                     callback: tp.Optional[dict] = None,
                     idempotency: tp.Optional[dict] = None) -> tp.Tuple[dict, bool]:
        """Queue a job: its upload written to the storage, then its record (with its
        `callback` and `idempotency`, `JobStore.create`); `(public view, replayed)`. A key
        of `idempotency` this client used before for the same request: the job it created,
        replayed true, nothing queued. Over a limit: `JobRefusedError`; the key under
        another request: `IdempotencyKeyReusedError`; nothing is kept."""
        answer = None if idempotency is None else \
            await self.store.replay.remote(client, idempotency)
        if answer is None:
            answer = await self._queue(key, client, data, options, name, callback, idempotency)
        if "reused" in answer:
            raise IdempotencyKeyReusedError(answer["reused"])
        return answer["job"], answer.get("replayed", False)

    async def _queue(self, key: tp.Optional[str], client: str, data: bytes,
                     options: SeparationOptions, name: str, callback: tp.Optional[dict],
                     idempotency: tp.Optional[dict]) -> dict:
        """`JobStore.create`'s answer for a new job (its upload kept only when queued)."""
        refused = await self.store.admission.remote(client, len(data))
        if refused is not None:
            raise JobRefusedError(refused)
        files = await self.files()
        job_id = uuid.uuid4().hex
        await asyncio.to_thread(files.write, "uploads", job_id, data)
        answer = await self.store.create.remote(job_id, key, client, len(data),
                                                options.model_dump(), name, callback,
                                                idempotency)
        if "refused" in answer:
            await asyncio.to_thread(files.delete, "uploads", job_id)
            raise JobRefusedError(answer["refused"])
        if "job" not in answer or answer.get("replayed"):  # the same key, sent at once twice
            await asyncio.to_thread(files.delete, "uploads", job_id)
            return answer
        self.watch()
        self._poke.set()
        return answer

    async def result(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[StoredResult]:
        """A finished job's ZIP, open, None when it is gone."""
        found = await self.store.result.remote(job_id, key)
        if found is None:
            return None
        file = await asyncio.to_thread((await self.files()).open, "results", found["name"])
        if file is None:
            return None
        return StoredResult(file, found["bytes"], found["headers"], found["song"])

    def cancel(self, job_id: str) -> None:
        task = self.running.get(job_id)
        if task is not None:
            task.cancel()

    def watch(self) -> None:
        """Start this replica's watcher once (from a request, or Serve's health check), in a
        context of its own: a task inherits the context of the call that creates it, and Ray
        and Serve cancel the calls made in a call's context when it is cancelled (a client
        that went away), so the jobs the watcher starts would lose their separation with it."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), context=contextvars.Context())

    async def _watch(self) -> None:
        """Report, stop what was cancelled, claim what the free slots can take; again every
        WATCH_S, or as soon as a job is queued here."""
        while True:
            try:
                await self._round()
            except Exception:  # noqa: BLE001 - the store restarting: try again
                logger.exception("job watcher")
            try:
                await asyncio.wait_for(self._poke.wait(), WATCH_S)
            except asyncio.TimeoutError:
                pass
            self._poke.clear()

    async def _round(self) -> None:
        answer = await self.store.heartbeat.remote(self.owner, list(self.running))
        for job_id in answer["stop"]:
            self.cancel(job_id)
        free = self.slots - len(self.running)
        if free > 0 and await self._ready():
            for job in await self.store.claim.remote(self.owner, free):
                self._start(job["id"], SeparationOptions(**job["options"]), job["filename"],
                            job.get("key"))

    def _start(self, job_id: str, options: SeparationOptions, name: str,
               key: tp.Optional[str]) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run_job(job_id, options, name, key))
        self.running[job_id] = task

        def ended(_) -> None:
            self.running.pop(job_id, None)
            self._poke.set()  # a slot is free
        task.add_done_callback(ended)

    async def _run_job(self, job_id: str, options: SeparationOptions, name: str,
                       key: tp.Optional[str]) -> None:
        """Run a job to its end and record it: the ZIP on the storage, or the error a client
        would have got from `POST /separate`."""
        try:
            files = await self.files()
            data = await asyncio.to_thread(files.read, "uploads", job_id)
            if data is None:  # ended meanwhile (cancelled), its upload deleted
                return
            archive, headers, cache_entry = await self._run(data, options, name, job_id, key)
            result = f"{job_id}-{uuid.uuid4().hex[:8]}"  # each run its own file
            size = await asyncio.to_thread(files.write, "results", result, archive)
            await self.store.finish.remote(job_id, result, size, headers, cache_entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the job, as /separate answers
            await self.store.fail.remote(job_id, error_record(exc, job_id))


def error_record(exc: Exception, job_id: str) -> dict:
    """What a failed job records: the client's error, or an internal one (logged)."""
    cause = getattr(exc, "cause", exc)
    if isinstance(cause, SeparationError):
        return {"status": cause.status_code, "error": cause.error, "detail": cause.detail}
    logger.error("job %s failed", job_id, exc_info=exc)
    return {"status": 500, "error": "internal_error",
            "detail": "the separation failed; the error is logged"}
