"""The `JobStore` actor on a real local Ray (in a process of its own): a call cancelled before
it reached the store does not hold up the calls after it, and a late update never moves a
job back."""
import json
import os
import signal
import subprocess
import sys

from serve_graph.procs import descendants, kill_all
from serve_process import ROOT

STORE = '''
import json, sys, time
import ray
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
print(json.dumps({"answered_s": answered_s, "created": created["job"]["status"],
                  "stage": view["stage"], "progress": view["progress"]}))
ray.shutdown()
'''


def test_a_call_cancelled_before_it_was_sent_holds_up_nothing_and_updates_move_forward(
        tmp_path):
    process = subprocess.Popen([sys.executable, "-c", STORE, str(tmp_path / "jobs")], cwd=ROOT,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        started = descendants(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        kill_all(started)
        out, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    # in order (Ray's default for such an actor), the claim waited for the cancelled call:
    # no answer in 20 s (at least 30 s, while calls keep coming)
    assert result["answered_s"] is not None and result["answered_s"] < 5, result
    assert result["created"] == "queued"
    assert result["stage"] == "encoding", result
    assert result["progress"]["windows_done"] == 8, result
