"""The jobs' actors on a real local Ray (in a process of their own): a call cancelled before it
reached the `JobStore` does not hold up the calls after it, a late update never moves a job
back, and a `JobRunner` (as an Ingress replica holds it) runs its jobs to their end when the
request that started it is cancelled, as Serve cancels a request whose client went away; a store
started with other settings or code is replaced, its jobs kept, and a replica's handle of
the old one finds the new one."""
import json

import pytest

from serve_process import run_python

STORE = '''
import asyncio, json, sys, time
import ray
from serve_graph.job_store_handle import StoreHandle
from serve_graph.jobs import job_store
from serve_graph.serve_run import init_ray

init_ray(include_dashboard=False, logging_level="ERROR")


@ray.remote(num_cpus=0)
def later(value):
    time.sleep(3)
    return value


store = job_store(60., sys.argv[1])
created = ray.get(store.create.remote("job1", None, "client", 10, {"model": "htdemucs"}, "a.wav"))
# a call that waits for its argument has not been sent to the store: cancelled there, as Serve
# cancels the calls of a request whose client went away
waiting = store.get.remote(later.remote("job1"), None)
ray.cancel(waiting)
start = time.monotonic()
ready, _ = ray.wait([store.claim.remote("replica", 1)], timeout=20)
answered_s = round(time.monotonic() - start, 2) if ready else None
if not ready:
    print(json.dumps({"answered_s": None}))
    sys.exit(0)
for fields in ({"stage": "separating", "windows_total": 8, "windows_done": 5},
               {"stage": "encoding", "windows_done": 8},
               {"stage": "separating", "windows_done": 6}):  # late: sent before the last
    store.update.remote("job1", **fields)
view = ray.get(store.get.remote("job1", None))
found = {"answered_s": answered_s, "created": created["job"]["status"],
         "stage": view["stage"], "progress": view["progress"]}

# a request sent again under its Idempotency-Key (its fingerprint f1): the job it created
same = {"key": "k1", "fingerprint": "f1"}
ray.get(store.create.remote("job2", None, "client", 10, {}, "b.wav", None, same))


def replayed(store, client="client", idempotency=same):
    answer = ray.get(store.replay.remote(client, idempotency))
    return {"id": answer["job"]["id"]} if answer and "job" in answer else answer


twin = ray.get(store.create.remote("job3", None, "client", 10, {}, "b.wav", None, same))
found["idempotency"] = {
    "again": replayed(store), "sent_twice_at_once": {"id": twin["job"]["id"],
                                                     "replayed": twin["replayed"]},
    "another_request": replayed(store, idempotency={"key": "k1", "fingerprint": "f2"}),
    "another_client": replayed(store, "client2"),
    "no_key": replayed(store, idempotency=None)}

# the store replaced when a deployment with other settings or code asks for it
import serve_graph.jobs as jobs
again = jobs.job_store(60., sys.argv[1])  # the same settings and code: the same store
other_ttl = jobs.job_store(120., sys.argv[1])  # settings changed: a new store
jobs.STORE_VERSION = "other code"  # as a deployment with other code for the store finds it
other_code = jobs.job_store(120., sys.argv[1])
try:
    ray.get(store.storage.remote(), timeout=30)
    first_stopped = False
except ray.exceptions.RayActorError:
    first_stopped = True
found["replaced"] = {
    "ids": [handle._actor_id.hex() for handle in (store, again, other_ttl, other_code)],
    "first_stopped": first_stopped,
    "ttl": ray.get(other_code.made_with.remote())["ttl_seconds"],
    "job_found": ray.get(other_code.get.remote("job1", None))["status"],
    "replayed": replayed(other_code)}


async def through_the_first():  # as a replica of the deployment before calls it
    return await StoreHandle(store).get.remote("job1", None)


found["replaced"]["through_the_first"] = asyncio.run(through_the_first())["status"]

# a job deleted while it ran, whose run then kept its stems in the result cache and finished:
# the copy is removed (by a task on each node)
from serve_graph.result_cache import ResultCache
cache, key = ResultCache(sys.argv[1] + "_cache", 2**20), "ab" * 32
cache.put(key, b"zip", {})
ray.get(other_code.create.remote("job4", None, "client4", 10, {}, "d.wav"))
ray.get(other_code.claim.remote("replica", 10))
ray.get(other_code.cancel.remote("job4", None))
finished = ray.get(other_code.finish.remote("job4", "job4-r", 3, {},
                                            {"key": key, "dir": str(cache.folder)}))
deadline = time.monotonic() + 30
while cache.get(key) is not None and time.monotonic() < deadline:
    time.sleep(0.2)
found["deleted_while_running"] = {"finished": finished, "cached": cache.get(key) is not None}
print(json.dumps(found))
ray.shutdown()
'''


RUNNER = '''
import asyncio, json, sys, time
import ray
from serve_graph.engine import SeparationOptions
from serve_graph.job_runner import JobRunner
from serve_graph.jobs import job_store
from serve_graph.serve_run import init_ray

init_ray(include_dashboard=False, logging_level="ERROR")


@ray.remote(num_cpus=0)
def separation(seconds):  # stands for the job's calls to Decode, Separate and Encode
    time.sleep(seconds)
    return b"zip"


@ray.remote(num_cpus=0)
class Replica:  # async, as an Ingress replica
    def __init__(self, store):
        self.runner = JobRunner(store, "replica", 1, self.run, self.ready)
        self.separating = False

    async def ready(self):
        return True

    async def run(self, data, options, name, job_id, key):
        pending = separation.remote(4.)
        self.separating = True
        return await pending, {}, None  # (no result cache)

    async def request(self):  # the first request of this replica: it starts the job watcher
        self.runner.watch()
        await asyncio.sleep(60)

    async def submit(self):
        job, _ = await self.runner.submit(None, "client", b"song", SeparationOptions(), "a.wav")
        return job

    def is_separating(self):
        return self.separating


store = job_store(60., sys.argv[1])
replica = Replica.remote(store)
request = replica.request.remote()
job = ray.get(replica.submit.remote())
deadline = time.monotonic() + 30
while not ray.get(replica.is_separating.remote()) and time.monotonic() < deadline:
    time.sleep(0.1)
ray.cancel(request)  # its client went away
while time.monotonic() < deadline + 30:
    view = ray.get(store.get.remote(job["id"], None))
    if view["status"] in ("done", "failed", "cancelled"):
        break
    time.sleep(0.2)
print(json.dumps({"status": view["status"], "error": view["error"]}))
ray.shutdown()
'''




def run_script(script: str, *args: str) -> dict:
    """The JSON object of the last line `script` printed (`run_python`)."""
    out, _ = run_python(script, *args)
    return json.loads(out.splitlines()[-1])


@pytest.fixture(scope="module")
def store_run(tmp_path_factory) -> dict:
    """What the STORE script found (one local Ray for the store's checks)."""
    return run_script(STORE, str(tmp_path_factory.mktemp("store") / "jobs"))


def test_a_call_cancelled_before_it_was_sent_holds_up_nothing_and_updates_move_forward(
        store_run):
    result = store_run
    # in order (Ray's default for such an actor), the claim waited for the cancelled call:
    # no answer in 20 s (at least 30 s, while calls keep coming)
    assert result["answered_s"] is not None and result["answered_s"] < 5, result
    assert result["created"] == "queued"
    assert result["stage"] == "encoding", result
    assert result["progress"]["windows_done"] == 8, result


def test_a_job_runs_to_its_end_when_the_request_that_started_its_runner_is_cancelled(
        tmp_path):
    """The runner's watcher, and the jobs it starts, began inside a request; Ray cancels a
    cancelled call's child calls, so they must not be that request's (before: the job's
    separation was cancelled with it and the job failed)."""
    result = run_script(RUNNER, str(tmp_path / "jobs"))
    assert result == {"status": "done", "error": None}


def test_a_store_of_other_settings_or_code_is_replaced_and_keeps_the_jobs(store_run):
    """The store is detached: it outlives a deployment. A service deployed again with other job
    settings, or other code for the store, replaces it (before: it kept the old one, whose code
    may lack what the new Ingress asks of it); the records come back from the storage."""
    result = store_run["replaced"]
    first, again, other_ttl, other_code = result["ids"]
    assert first == again and len({first, other_ttl, other_code}) == 3, result
    assert result["first_stopped"] and result["ttl"] == 120.
    assert result["job_found"] == "running"  # its record read back from the storage
    assert result["replayed"] == {"id": "job2"}  # its Idempotency-Key too
    # a replica of the deployment before (during a rolling update) calls the first store, now
    # stopped: its call goes to the store that replaced it (before: ActorDiedError, a 500)
    assert result["through_the_first"] == "running"


def test_a_job_deleted_while_it_ran_leaves_no_copy_in_the_result_cache(store_run):
    """Its run, not yet stopped, finished and kept its stems in the cache after the DELETE:
    the store refuses the result and removes that copy (the DELETE of a finished job removes
    its copy too: tests/test_integrations.py)."""
    assert store_run["deleted_while_running"] == {"finished": False, "cached": False}


def test_a_job_request_sent_again_under_its_idempotency_key_gets_the_same_job(store_run):
    result = store_run["idempotency"]
    assert result["again"] == {"id": "job2"}
    assert result["sent_twice_at_once"] == {"id": "job2", "replayed": True}  # no job3
    assert "job2" in result["another_request"]["reused"]
    assert result["another_client"] is None and result["no_key"] is None
