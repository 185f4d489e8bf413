"""Asynchronous jobs: `POST /jobs` answers at once, the separation runs in the background, and
its state (status, stage, windows done, ETA, where the ZIP is) is kept in `JobStore`.

Where things live. The records: in a *detached Ray actor* (`JobStore`, named, in its own
namespace), which is also the queue, and written through to the job storage (`job_files`) on
each change of status, so that a restarted actor, or a restarted service on the same storage,
finds every job again. The bytes (uploads, ZIPs): on the job storage only, never in an actor's
heap; the Ingress replica that took an upload writes it before the 202, the one that ran the job
writes its ZIP. Ingress replicas take queued jobs from the store (`claim`), fairly across
clients, at most `jobs_per_replica` each; a running job whose replica has not been heard of for
`ORPHAN_AFTER_S` goes back to the queue and starts again from its upload.

Limits (`JobLimits`, from serve_config.yaml's `args`): jobs queued and running in all and per
client (API key, or address without keys): 429 with Retry-After; bytes of uploads and results
held on the storage: 507.

A job record's public view (`public`):
`{id, status, stage, progress: {windows_done, windows_total, fraction}, eta_seconds, model,
song, audio_seconds, created_at, updated_at, expires_at, error, callback}`; status is queued,
running, done, failed or cancelled; stage is queued, decoding, separating, encoding or the
final status.

One store per cluster outlives the service's replicas (it is detached): a service deployed
again with other job settings or other code for the store (`STORE_VERSION`) replaces it at its
Ingress replicas' start (`job_store`); the records are read back from the storage.

Retried requests (`replay`): a `POST /jobs` with an `Idempotency-Key` header whose key this
client used before gets the job that key created, not a second one, for as long as that job
is kept (until it expires); the key under another request (another fingerprint) is refused.
The key is kept in the job's record, so a restarted store still knows it.

Callbacks (`webhooks`): a job created with a `callback_url` has its status JSON POSTed there,
signed, when it ends; the store's thread makes the attempts, and each is kept in the record
(`callback: {url, state, attempts}`), so a restarted store resumes the pending ones.
"""
import hashlib
import logging
import time
import typing as tp
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from .job_files import JobFiles
from .result_cache import remove_everywhere
from .webhooks import Delivery, Sender, body_of

logger = logging.getLogger("ray.serve")
NAME, NAMESPACE = "serve_graph_jobs", "serve_graph"
ORPHAN_AFTER_S = 6.  # a running job whose owner has not been heard of for this long is re-run
MAX_ATTEMPTS = 3  # a job whose replica died this many times under it fails instead
FINAL = ("done", "failed", "cancelled")
# the code the store runs: its module, its files', its callbacks' and the result cache's
# removal of a deleted job's entry (a store started by an earlier deployment runs that
# deployment's code until it is replaced)
STORE_VERSION = hashlib.sha256(b"".join(
    (Path(__file__).parent / name).read_bytes()
    for name in ("jobs.py", "job_files.py", "webhooks.py", "result_cache.py"))).hexdigest()[:16]
STATUSES = ("queued", "running") + FINAL
JOBS_RETRY_AFTER_S = 30  # Retry-After when the queue is full


@dataclass(frozen=True)
class JobLimits:
    """What the jobs may hold (0: no limit)."""
    max_jobs: int = 100  # queued and running, in all
    max_jobs_per_client: int = 10  # queued and running, per API key (per address without keys)
    max_storage_bytes: int = 10 * 2**30  # uploads and results on the job storage


def key_id(api_key: tp.Optional[str]) -> tp.Optional[str]:
    """What a job keeps of the API key that created it (a hash, never the key)."""
    return None if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:16]


def refusal(status: int, error: str, detail: str, retry_after: float) -> dict:
    return {"status": status, "error": error, "detail": detail,
            "retry_after": max(1, int(retry_after + 0.999))}


# A run's stages, in order (`JobStore.update` never moves a job back; `claim` starts a run)
RUN_STAGES = ("decoding", "separating", "encoding")


# Out of order: with Ray's default for a one-thread actor, its calls from each caller run in
# the order they were sent, and one call cancelled before it was sent (an Ingress request
# whose client went away, cancelled with its child calls) left the store waiting for it,
# with every later call of that caller, for as long as such calls kept coming (Ray's 30 s
# wait restarts with each); so a replica's heartbeats and `finish` stood still and its jobs
# never ended. No call here relies on the order of another's (`update` moves forward only).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,
            allow_out_of_order_execution=True)
class JobStore:
    """Job records and the queue, by job id; the bytes are on `JobFiles`. Every method is
    quick (no separation work here), safe to run twice (Ray retries a call across a
    restart of this actor) and in any order: the Ingress replicas run the jobs and report to
    it; Encode reports windows done."""

    def __init__(self, ttl_seconds: float, storage: tp.Optional[str] = None,
                 limits: tp.Optional[dict] = None, webhooks: tp.Optional[dict] = None):
        self._made_with = store_settings(ttl_seconds, storage, limits, webhooks)
        self.ttl = ttl_seconds
        self.limits = JobLimits(**(limits or {}))
        self.files = JobFiles(storage or default_storage())
        self.id = uuid.uuid4().hex
        self.files.claim_root(self.id)
        self.webhooks = webhooks or {}
        self._sender: tp.Optional[Sender] = None
        self.jobs: tp.Dict[str, dict] = self._load()
        for job in self.jobs.values():  # callbacks a killed store left to make
            if job["status"] in FINAL and (job.get("callback") or {}).get("state") == "pending":
                self._call_back(job)

    def _load(self) -> tp.Dict[str, dict]:
        """The records on the storage; those that were running are heard of now (their
        replica, if alive, goes on; if not, they return to the queue after ORPHAN_AFTER_S)."""
        jobs, now = {}, time.time()
        for name in self.files.names("records"):
            try:
                job = self.files.read_json("records", name)
            except ValueError:
                continue  # not a record of ours
            if job is not None:
                job["heard_at"] = now
                jobs[job["id"]] = job
        return jobs

    def made_with(self) -> dict:
        """What this store was started with (`store_settings`), its code's version included."""
        return self._made_with

    def storage(self) -> dict:
        """Where the bytes go, and this store's id (`JobFiles.shared_with`)."""
        return {"url": self.files.url, "store": self.id}

    def _save(self, job: dict) -> None:
        self.files.write_json("records", job["id"], job)

    def _active(self) -> tp.List[dict]:
        return [job for job in self.jobs.values() if job["status"] not in FINAL]

    def admission(self, client: str, nbytes: int) -> tp.Optional[dict]:
        """Why a job of `nbytes` from `client` would be refused now (`refusal`), or None."""
        active, limits = self._active(), self.limits
        if limits.max_jobs and len(active) >= limits.max_jobs:
            return refusal(429, "too_many_jobs", f"the service holds its limit of "
                           f"{limits.max_jobs} queued and running jobs (max_jobs); retry "
                           f"later", JOBS_RETRY_AFTER_S)
        mine = sum(job["client"] == client for job in active)
        if limits.max_jobs_per_client and mine >= limits.max_jobs_per_client:
            return refusal(429, "too_many_jobs", f"this client has {mine} queued and running "
                           f"jobs, its limit (max_jobs_per_client); retry once one has ended",
                           JOBS_RETRY_AFTER_S)
        held = sum(job["upload_bytes"] + job["result_bytes"] for job in self.jobs.values())
        if limits.max_storage_bytes and held + nbytes > limits.max_storage_bytes:
            ends = [job["finished_at"] + self.ttl for job in self.jobs.values()
                    if job["finished_at"] and job["result_bytes"]]
            return refusal(507, "storage_full", f"the job storage holds "
                           f"{held / 2**20:.0f} MB of uploads and results, and this upload "
                           f"would take it past its limit of "
                           f"{limits.max_storage_bytes / 2**20:.0f} MB (max_job_storage_mb)",
                           min(ends, default=time.time() + JOBS_RETRY_AFTER_S) - time.time())
        return None

    def replay(self, client: str, idempotency: tp.Optional[dict]) -> tp.Optional[dict]:
        """What a request of `client` under `idempotency` (`{"key", "fingerprint"}` of its
        `Idempotency-Key` header; None without one) gets again: `{"job": view, "replayed":
        True}`, the job an earlier request of the same fingerprint created under that key;
        `{"reused": detail}` when that request differed; None when the key is new to this
        client (or its job expired)."""
        if idempotency is None:
            return None
        self._expire()
        job = next((job for job in self.jobs.values() if job["client"] == client
                    and (job.get("idempotency") or {}).get("key") == idempotency["key"]), None)
        if job is None:
            return None
        if job["idempotency"]["fingerprint"] != idempotency["fingerprint"]:
            return {"reused": f"this Idempotency-Key was used for job {job['id']}, created "
                              f"by another request (another song, options or callback); a new "
                              f"request takes a new key"}
        return {"job": public(job, self.ttl), "replayed": True}

    def create(self, job_id: str, key: tp.Optional[str], client: str, nbytes: int,
               options: dict, filename: str, callback: tp.Optional[dict] = None,
               idempotency: tp.Optional[dict] = None) -> dict:
        """Queue job `job_id`, whose upload of `nbytes` is on the storage: `{"job": view}`,
        or `{"refused": refusal}` over a limit (the caller then deletes the upload), or what
        `replay` answers for `idempotency` when its key is not new (the upload is not used).
        `callback`: `{"url", "secret"}` (secret None: the configured one), called when the
        job ends."""
        if job_id in self.jobs:
            return {"job": public(self.jobs[job_id], self.ttl)}
        replayed = self.replay(client, idempotency)
        if replayed is not None:
            return replayed
        refused = self.admission(client, nbytes)
        if refused is not None:
            return {"refused": refused}
        now = time.time()
        job = {"id": job_id, "status": "queued", "stage": "queued",
               "windows_done": 0, "windows_total": None, "key": key, "client": client,
               "model": options.get("model"), "options": options, "filename": filename,
               "audio_seconds": None, "created_at": now, "updated_at": now,
               "started_at": None, "separating_since": None, "finished_at": None,
               "error": None, "owner": None, "heard_at": now, "attempts": 0,
               "upload_bytes": nbytes, "result_bytes": 0, "result": None, "headers": None,
               "cache_entry": None,
               "callback": callback and {**callback, "state": None, "attempts": []},
               "idempotency": idempotency}
        self.jobs[job_id] = job
        self._save(job)
        return {"job": public(job, self.ttl)}

    def claim(self, owner: str, count: int) -> tp.List[dict]:
        """Up to `count` queued jobs for replica `owner` to run now (`{id, options,
        filename, key}`), taken round-robin across clients: the client with the fewest jobs
        running, then the one whose last job started longest ago, then the oldest job."""
        queued = sorted((job for job in self.jobs.values() if job["status"] == "queued"),
                        key=lambda job: job["created_at"])
        running: Counter = Counter()
        last_start: tp.Dict[str, float] = {}
        for job in self.jobs.values():
            running[job["client"]] += job["status"] == "running"
            if job["started_at"]:
                last_start[job["client"]] = max(last_start.get(job["client"], 0.),
                                                job["started_at"])
        taken = []
        while queued and len(taken) < count:
            job = min(queued, key=lambda job: (running[job["client"]],
                                               last_start.get(job["client"], 0.)))
            queued.remove(job)
            if job["attempts"] >= MAX_ATTEMPTS:
                self._fail_exhausted(job)
                continue
            now = time.time()
            running[job["client"]] += 1
            last_start[job["client"]] = now
            job.update(status="running", stage="decoding", owner=owner, heard_at=now,
                       updated_at=now, started_at=now, attempts=job["attempts"] + 1)
            self._save(job)
            taken.append({key: job[key] for key in ("id", "options", "filename", "key")})
        return taken

    def _fail_exhausted(self, job: dict) -> None:
        self._end(job["id"], "failed", error={
            "status": 500, "error": "internal_error",
            "detail": f"the job's replica was lost {job['attempts']} times while running it; "
                      f"the error is logged"})

    def _owned(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[dict]:
        """The record of `job_id`, None when unknown or another key's."""
        job = self.jobs.get(job_id)
        return None if job is None or job["key"] != key else job

    def get(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[dict]:
        """The public view of `job_id`, None when unknown, expired or another key's."""
        self._expire()
        job = self._owned(job_id, key)
        return None if job is None else public(job, self.ttl)

    def listed(self, client: str, status: tp.Optional[str], limit: int,
               before: tp.Optional[float]) -> dict:
        """`client`'s jobs (`request_client`: its key, or its address without keys), newest
        first: `{"jobs": [public view], "more": bool}`, at most `limit` of them, created
        before `before` (the last one's `created_at` of the page before), of `status` alone
        when given."""
        self._expire()
        mine = sorted((job for job in self.jobs.values() if job["client"] == client
                       and status in (None, job["status"])
                       and (before is None or job["created_at"] < before)),
                      key=lambda job: job["created_at"], reverse=True)
        return {"jobs": [public(job, self.ttl) for job in mine[:limit]],
                "more": len(mine) > limit}

    def update(self, job_id: str, **fields) -> None:
        """Stage changes and progress from the job's runner (Ingress) and from Encode."""
        job = self.jobs.get(job_id)
        if job is None or job["status"] != "running":
            return
        now = time.time()
        fields = forward_only(job, fields)
        if fields.get("stage") == "separating" and job["separating_since"] is None:
            job["separating_since"] = now
        job.update(fields, updated_at=now, heard_at=now)

    def finish(self, job_id: str, result: str, nbytes: int, headers: dict,
               cache_entry: tp.Optional[dict] = None) -> bool:
        """The job's ZIP is on the storage as `results/<result>`, and in the result cache as
        `cache_entry` (`{"key", "dir"}`, or None); false (and the file deleted) when the job
        had already ended, cancelled or finished by another run. A job deleted while it ran
        leaves no entry in the cache either."""
        if self._end(job_id, "done", result=result, result_bytes=nbytes, headers=headers,
                     cache_entry=cache_entry):
            return True
        self.files.delete("results", result)
        job = self.jobs.get(job_id)
        if job is None or job["status"] == "cancelled":
            _remove_cached(cache_entry)
        return False

    def fail(self, job_id: str, error: dict) -> None:
        self._end(job_id, "failed", error=error)

    def cancel(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[dict]:
        """Cancel a queued or running job (its runner sees it on its next heartbeat and stops
        its work); forget one that has ended now, as at its expiry (its result and record
        deleted: its view's `expires_at` is now), its result's copy in the result cache with
        it. None when unknown or another key's."""
        job = self._owned(job_id, key)
        if job is None:
            return None
        if job["status"] in FINAL:
            self._forget(job_id)
            _remove_cached(job.get("cache_entry"))  # the stems' copy in the result cache too
            return {**public(job, self.ttl), "expires_at": time.time()}
        self._end(job_id, "cancelled")
        return public(job, self.ttl)

    def result(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[dict]:
        """`{"name", "headers", "bytes", "song"}` of a finished job's ZIP on the storage
        (`song`: the song's name, as its upload's file name gave it)."""
        job = self._owned(job_id, key)
        if job is None or job["result"] is None:
            return None
        return {"name": job["result"], "headers": job["headers"], "bytes": job["result_bytes"],
                "song": job["filename"]}

    def heartbeat(self, owner: str, running: tp.List[str]) -> tp.Dict[str, tp.List[str]]:
        """From an Ingress replica running `running`: marks them heard of (and its own, after
        a restart of this store), answers which of them were cancelled or ended elsewhere
        (`stop`), and puts the running jobs of replicas not heard of for ORPHAN_AFTER_S back
        in the queue."""
        now = time.time()
        stop = []
        for job_id in running:
            job = self.jobs.get(job_id)
            if job is None or job["status"] != "running":
                stop.append(job_id)
            else:
                job.update(owner=owner, heard_at=now)
        for job in self._active():
            if job["status"] == "running" and now - job["heard_at"] > ORPHAN_AFTER_S:
                job.update(owner=None, status="queued", stage="queued", windows_done=0,
                           separating_since=None, updated_at=now)
                self._save(job)
        self._expire()
        return {"stop": stop}

    def _end(self, job_id: str, status: str, **fields) -> bool:
        """End `job_id` (its record updated with `fields`, saved, its callback queued); false
        when it had already ended."""
        job = self.jobs.get(job_id)
        if job is None or job["status"] in FINAL:
            return False
        now = time.time()
        job.update(status=status, stage=status, updated_at=now, finished_at=now,
                   upload_bytes=0, **fields)
        self.files.delete("uploads", job_id)
        if job.get("callback"):
            job["callback"]["state"] = "pending"
        self._save(job)
        if job.get("callback"):
            self._call_back(job)
        return True

    def _call_back(self, job: dict) -> None:
        """Queue the delivery of `job`'s status to its callback URL (`webhooks.Sender`)."""
        callback = job["callback"]
        if self._sender is None:
            me = ray.get_runtime_context().current_actor
            self._sender = Sender(lambda *report: me.delivered.remote(*report),
                                  self.webhooks.get("timeout_s", 10.),
                                  self.webhooks.get("allow", ()))
        delivery = Delivery(job["id"], f"{job['id']}-{job['status']}", callback["url"],
                            callback["secret"] or self.webhooks.get("secret") or "",
                            body_of(with_links(public(job, self.ttl))),
                            job["finished_at"] + self.webhooks.get("retry_s", 3600.))
        self._sender.queue(delivery, len(callback["attempts"]))

    def delivered(self, job_id: str, attempt: dict, state: str) -> None:
        """An attempt at `job_id`'s callback (`webhooks.Sender`): kept in its record."""
        job = self.jobs.get(job_id)
        if job is None or not job.get("callback"):
            return
        job["callback"]["attempts"].append(attempt)
        job["callback"]["state"] = state
        self._save(job)

    def _expire(self) -> None:
        now = time.time()
        for job_id in [job_id for job_id, job in self.jobs.items()
                       if job["finished_at"] and now - job["finished_at"] > self.ttl]:
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        """Drop ended job `job_id`: its record, and its result from the storage."""
        job = self.jobs.pop(job_id)
        if job["result"]:
            self.files.delete("results", job["result"])
        self.files.delete("records", job_id)


def _remove_cached(entry: tp.Optional[dict]) -> None:
    """Remove a job's result cache `entry` (`{"key", "dir"}`) from every node; a failure to
    send the removal is logged, never the failure of the call that deleted the job."""
    if not entry:
        return
    try:
        remove_everywhere(entry["dir"], entry["key"])
    except Exception:  # noqa: BLE001 - the cache's own eviction removes it in time
        logger.exception("could not remove a deleted job's result cache entry")


def forward_only(job: dict, fields: dict) -> dict:
    """`fields` of an update less what would move a running job back: an earlier stage of
    the run (`RUN_STAGES`), fewer windows done (an update that arrived late)."""
    fields = dict(fields)
    stage = fields.get("stage")
    if stage in RUN_STAGES and job["stage"] in RUN_STAGES and \
            RUN_STAGES.index(stage) < RUN_STAGES.index(job["stage"]):
        del fields["stage"]
    if fields.get("windows_done") is not None:
        fields["windows_done"] = max(fields["windows_done"], job["windows_done"] or 0)
    return fields


def default_storage() -> str:
    """A folder in this Ray session's directory (on this node): kept while Ray runs."""
    from ray._private import worker
    return f"{worker.global_worker.node.get_session_dir_path()}/serve_graph_jobs"


def public(job: dict, ttl: float) -> dict:
    """What a client sees of a job record."""
    done, total = job["windows_done"], job["windows_total"]
    fraction = 1. if job["status"] == "done" else (done / total if total else 0.)
    return {"id": job["id"], "status": job["status"], "stage": job["stage"],
            "progress": {"windows_done": done, "windows_total": total,
                         "fraction": round(fraction, 4)},
            "eta_seconds": _eta(job), "model": job["model"], "song": job["filename"],
            "audio_seconds": job["audio_seconds"], "created_at": job["created_at"],
            "updated_at": job["updated_at"],
            "expires_at": job["finished_at"] + ttl if job["finished_at"] else None,
            "error": job["error"], "callback": _callback_view(job.get("callback"))}


def _callback_view(callback: tp.Optional[dict]) -> tp.Optional[dict]:
    """What a client sees of a job's callback: its URL, state (None until the job ends, then
    pending, delivered or failed) and attempts; never its secret."""
    if not callback:
        return None
    return {"url": callback["url"], "state": callback["state"],
            "attempts": callback["attempts"]}


def with_links(job: dict) -> dict:
    """A job's public view with the URLs to follow it (relative to the service)."""
    base = f"/jobs/{job['id']}"
    return {**job, "status_url": base, "events_url": f"{base}/events",
            "result_url": f"{base}/result", "stems_url": f"{base}/stems"}


def _eta(job: dict) -> tp.Optional[float]:
    """Seconds left at the pace of the windows so far (None before the first window)."""
    if job["status"] in FINAL:
        return 0. if job["status"] == "done" else None
    since, done, total = job["separating_since"], job["windows_done"], job["windows_total"]
    if not since or not done or not total:
        return None
    return round((time.time() - since) / done * (total - done), 1)


def job_store(ttl_seconds: float = 3600., storage: tp.Optional[str] = None,
              limits: JobLimits = JobLimits(), webhooks: tp.Optional[dict] = None):
    """The service's `JobStore`: the running one, or a new detached one. A running one started
    with other settings or other code (an earlier deployment's) is replaced: it is stopped and
    a new one reads the records back from the storage. Without a configured `storage` its
    folder is on its own node's disk, so it is placed on the node of the (Ingress) replica that
    creates it: on a cluster, the one Ingress replica sees it."""
    args = (ttl_seconds, storage, asdict(limits), webhooks)
    try:
        running = ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:  # none yet: a new one (its start is not waited for here)
        return _running_or_new(*args)
    if _made_with(running) == store_settings(*args):
        return running
    logger.info("the job store was started with other settings or code: replacing it")
    ray.kill(running, no_restart=True)
    _wait_unnamed(running)
    return _running_or_new(*args)  # a new one, or the one another replica just started


def store_settings(ttl_seconds: float, storage: tp.Optional[str], limits: tp.Optional[dict],
                   webhooks: tp.Optional[dict]) -> dict:
    return {"version": STORE_VERSION, "ttl_seconds": ttl_seconds, "storage": storage,
            "limits": limits or {}, "webhooks": webhooks or {}}


def _running_or_new(ttl_seconds, storage, limits, webhooks):
    placement = {}
    if storage is None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)
    return JobStore.options(name=NAME, namespace=NAMESPACE, lifetime="detached",
                            get_if_exists=True, **placement).remote(
        ttl_seconds, storage, limits, webhooks)


def _made_with(store) -> tp.Optional[dict]:
    """What `store` was started with; None for a store of code before `made_with`, or one
    that another replica has just stopped to replace it."""
    try:
        return ray.get(store.made_with.remote(), timeout=60)
    except (AttributeError, ray.exceptions.RayActorError):
        return None


def _wait_unnamed(store, timeout: float = 30.) -> None:
    """Until the name no longer leads to `store` (killed), so that a new one can take it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ray.get_actor(NAME, namespace=NAMESPACE)._actor_id != store._actor_id:
                return
        except ValueError:  # no actor of that name
            return
        time.sleep(0.1)
    raise RuntimeError(f"the job store {NAME} did not stop in {timeout} s")


class Progress:
    """Reports a job's windows done to its store from Encode, at most every `every` seconds
    (and always the last one); does nothing without a job."""

    def __init__(self, job_id: tp.Optional[str], total: int, every: float = 0.25):
        self.job_id, self.total, self.every = job_id, total, every
        self._store = ray.get_actor(NAME, namespace=NAMESPACE) if job_id else None
        self._sent = 0.

    def windows_done(self, done: int) -> None:
        if self._store is None:
            return
        now = time.monotonic()
        if done == self.total or now - self._sent >= self.every:
            self._sent = now
            stage = "encoding" if done == self.total else "separating"
            self._store.update.remote(self.job_id, windows_done=done, stage=stage)
