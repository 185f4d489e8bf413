"""Asynchronous jobs: `POST /jobs` answers at once, the separation runs in the background, and
its state (status, stage, windows done, ETA, the ZIP) is kept in `JobStore`.

Where the state lives: a *detached Ray actor* (`JobStore`, named, in its own namespace), not
Redis. It outlives any Ingress replica, needs nothing beyond the Ray cluster the service already
runs on, and holds each job's upload until the job ends, so the Ingress replica that picks up
an orphaned job (its owner died: no heartbeat for `ORPHAN_AFTER_S`) can run it again from the
start. It does not outlive the Ray cluster itself (a cluster restart loses the jobs); that
would take an external store.

A job record's public view (`public`):
`{id, status, stage, progress: {windows_done, windows_total, fraction}, eta_seconds, model,
audio_seconds, created_at, updated_at, expires_at, error}`; status is queued, running, done,
failed or cancelled; stage is queued, decoding, separating, encoding or the final status.
"""
import hashlib
import time
import typing as tp
import uuid

import ray

NAME, NAMESPACE = "serve_graph_jobs", "serve_graph"
ORPHAN_AFTER_S = 6.  # a running job whose owner has not been heard of for this long is re-run
FINAL = ("done", "failed", "cancelled")


def key_id(api_key: tp.Optional[str]) -> tp.Optional[str]:
    """What a job keeps of the API key that created it (a hash, never the key)."""
    return None if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:16]


@ray.remote(num_cpus=0, max_restarts=-1)
class JobStore:
    """Job records, uploads and results, by job id. Every method is quick (no separation work
    here): the Ingress replicas run the jobs and report to it; Encode reports windows done."""

    def __init__(self, ttl_seconds: float):
        self.ttl = ttl_seconds
        self.jobs: tp.Dict[str, dict] = {}
        self.uploads: tp.Dict[str, tp.Tuple[bytes, dict, str]] = {}
        self.results: tp.Dict[str, tp.Tuple[bytes, dict]] = {}

    def create(self, owner: str, key: tp.Optional[str], data: bytes, options: dict,
               filename: str) -> dict:
        job_id = uuid.uuid4().hex
        now = time.time()
        self.jobs[job_id] = {"id": job_id, "status": "queued", "stage": "queued",
                             "windows_done": 0, "windows_total": None, "key": key,
                             "model": options.get("model"), "audio_seconds": None,
                             "created_at": now, "updated_at": now, "started_at": None,
                             "separating_since": None, "finished_at": None, "error": None,
                             "owner": owner, "heard_at": now, "attempts": 1}
        self.uploads[job_id] = (data, options, filename)
        return public(self.jobs[job_id], self.ttl)

    def _owned(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[dict]:
        """The record of `job_id`, None when unknown or another key's."""
        job = self.jobs.get(job_id)
        return None if job is None or job["key"] != key else job

    def get(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[dict]:
        """The public view of `job_id`, None when unknown, expired or another key's."""
        self._expire()
        job = self._owned(job_id, key)
        return None if job is None else public(job, self.ttl)

    def upload(self, job_id: str) -> tp.Optional[tp.Tuple[bytes, dict, str]]:
        return self.uploads.get(job_id)

    def update(self, job_id: str, **fields) -> None:
        """Stage changes and progress from the job's runner (Ingress) and from Encode."""
        job = self.jobs.get(job_id)
        if job is None or job["status"] in FINAL:
            return
        now = time.time()
        if fields.get("stage") == "separating" and job["separating_since"] is None:
            job["separating_since"] = now
        if job["status"] == "queued":
            job["status"], job["started_at"] = "running", now
        job.update(fields, updated_at=now, heard_at=now)

    def finish(self, job_id: str, archive: bytes, headers: dict) -> None:
        if self._end(job_id, "done"):
            self.results[job_id] = (archive, headers)

    def fail(self, job_id: str, error: dict) -> None:
        if self._end(job_id, "failed"):
            self.jobs[job_id]["error"] = error

    def cancel(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[dict]:
        """Cancel a queued or running job (its runner sees it on its next heartbeat and stops
        its work); None when unknown or another key's."""
        job = self._owned(job_id, key)
        if job is None:
            return None
        self._end(job_id, "cancelled")
        return public(job, self.ttl)

    def result(self, job_id: str, key: tp.Optional[str]) -> tp.Optional[tp.Tuple[bytes, dict]]:
        return None if self._owned(job_id, key) is None else self.results.get(job_id)

    def heartbeat(self, owner: str, running: tp.List[str]) -> tp.Dict[str, tp.List[str]]:
        """From an Ingress replica running `running`: marks them heard of, and answers which
        of them were cancelled (`stop`) and which orphaned jobs it now owns (`adopt`: their
        owner was not heard of for `ORPHAN_AFTER_S`; they start again from the upload)."""
        now = time.time()
        stop = []
        for job_id in running:
            job = self.jobs.get(job_id)
            if job is None or job["status"] in FINAL:
                stop.append(job_id)
            else:
                job["heard_at"] = now
        adopt = []
        for job_id, job in self.jobs.items():
            if (job["status"] not in FINAL and job["owner"] != owner and
                    now - job["heard_at"] > ORPHAN_AFTER_S):
                job.update(owner=owner, heard_at=now, attempts=job["attempts"] + 1,
                           status="queued", stage="queued", windows_done=0)
                adopt.append(job_id)
        self._expire()
        return {"stop": stop, "adopt": adopt}

    def _end(self, job_id: str, status: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None or job["status"] in FINAL:
            return False
        now = time.time()
        job.update(status=status, stage=status, updated_at=now, finished_at=now)
        self.uploads.pop(job_id, None)
        return True

    def _expire(self) -> None:
        now = time.time()
        for job_id in [job_id for job_id, job in self.jobs.items()
                       if job["finished_at"] and now - job["finished_at"] > self.ttl]:
            del self.jobs[job_id]
            self.results.pop(job_id, None)


def public(job: dict, ttl: float) -> dict:
    """What a client sees of a job record."""
    done, total = job["windows_done"], job["windows_total"]
    fraction = 1. if job["status"] == "done" else (done / total if total else 0.)
    return {"id": job["id"], "status": job["status"], "stage": job["stage"],
            "progress": {"windows_done": done, "windows_total": total,
                         "fraction": round(fraction, 4)},
            "eta_seconds": _eta(job), "model": job["model"],
            "audio_seconds": job["audio_seconds"], "created_at": job["created_at"],
            "updated_at": job["updated_at"],
            "expires_at": job["finished_at"] + ttl if job["finished_at"] else None,
            "error": job["error"]}


def _eta(job: dict) -> tp.Optional[float]:
    """Seconds left at the pace of the windows so far (None before the first window)."""
    if job["status"] in FINAL:
        return 0. if job["status"] == "done" else None
    since, done, total = job["separating_since"], job["windows_done"], job["windows_total"]
    if not since or not done or not total:
        return None
    return round((time.time() - since) / done * (total - done), 1)


def job_store(ttl_seconds: float = 3600.):
    """The service's `JobStore`: the running one, or a new detached one."""
    return JobStore.options(name=NAME, namespace=NAMESPACE, lifetime="detached",
                            get_if_exists=True).remote(ttl_seconds)


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
