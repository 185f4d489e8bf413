"""The Separate deployment's model loads on a real Serve (its own local Ray, in a process of
its own): a load whose caller is cancelled, as Serve cancels a request whose client went away,
goes on, and the next caller for that model waits for it instead of starting a second load;
a load no caller comes back for is let go."""
import json

import pytest

from serve_process import run_python

pytestmark = pytest.mark.serve

SLOW_LOADS = '''
import json, sys, time
from ray import serve
from ray.serve.exceptions import RequestCancelledError
from serve_graph.separate import Separate
from serve_graph.serve_run import start_local_ray
from serve_graph.settings import ServiceSettings

LOAD_S = 4.


class SlowLoads(Separate.func_or_class):
    """Separate whose loads of extra models take LOAD_S more and are counted, and which lets
    go of a model no caller took within 1 s."""
    UNCLAIMED_S = 1.

    def _build(self, name, download=True):
        if name != self._settings.model:
            self.loads = {**getattr(self, "loads", {}), name: self.loads_of(name) + 1}
            time.sleep(LOAD_S)
        return super()._build(name, download)

    def loads_of(self, name):
        return getattr(self, "loads", {}).get(name, 0)

    def held(self):
        """The models held: those the multiplexer keeps, and loads no caller took (yet)."""
        return {"untaken": sorted(self._started), "loaded": sorted(self._loaded)}


start_local_ray()
serve.start(proxy_location="Disabled")  # called by handle: no HTTP proxy
settings = ServiceSettings(model="htdemucs", models=("tinybag", "tiny6s"),
                           model_repo=sys.argv[1],
                           device="cpu")
deployment = serve.deployment(max_ongoing_requests=8,
                              ray_actor_options={"num_cpus": 0})(SlowLoads)
handle = serve.run(deployment.bind(settings), name="loads", route_prefix=None)


def cancelled_half_way(name):
    """Whether a call for model `name`, cancelled half-way through its load, was cancelled."""
    first = handle.info.remote(name)
    time.sleep(LOAD_S / 2)
    first.cancel()
    try:
        first.result(timeout_s=30)
        return False
    except RequestCancelledError:
        return True


abandoned = cancelled_half_way("tiny6s")  # and never asked for again
cancelled = cancelled_half_way("tinybag")  # asked for again at once, as a retry
start = time.monotonic()
info = handle.info.remote("tinybag").result(timeout_s=60)
waited_s = time.monotonic() - start
again = handle.info.remote("tinybag").result(timeout_s=30)  # kept loaded: no load more
print(json.dumps({"cancelled": cancelled, "states": [info["state"], again["state"]],
                  "waited_s": waited_s,
                  "loads": handle.loads_of.remote("tinybag").result(timeout_s=30),
                  "abandoned": abandoned, "held": handle.held.remote().result(timeout_s=30)}))
serve.shutdown()
'''


@pytest.fixture(scope="module")
def slow_loads(tiny_repo) -> dict:
    """What the SLOW_LOADS script found (its error output under "err")."""
    out, err = run_python(SLOW_LOADS, str(tiny_repo), timeout=180)
    return {**json.loads([line for line in out.splitlines() if line.startswith("{")][-1]),
            "err": err[-3000:]}


def test_a_load_whose_caller_was_cancelled_is_not_started_twice(slow_loads):
    result = slow_loads
    assert result["cancelled"], result
    assert result["states"] == ["loaded", "loaded"], result
    # before: Serve let the next caller in when the first was cancelled, and it started a
    # second load beside the first (whose thread went on): 2 loads, the full 4 s again; now
    # the next caller waits for the rest of the first (~2 s)
    assert result["loads"] == 1, result
    assert result["waited_s"] < 4, result


def test_a_load_no_caller_takes_is_let_go(slow_loads):
    """A model loaded for a caller that went away and never came back: held outside the
    multiplexer's count of MODELS_PER_REPLICA, it is let go once no caller took it in time
    (before: held for the replica's life)."""
    result = slow_loads
    assert result["abandoned"], result
    # the default model, loaded at the replica's start, waits for its first request
    assert result["held"] == {"untaken": ["htdemucs"], "loaded": ["htdemucs", "tinybag"]}, \
        result
