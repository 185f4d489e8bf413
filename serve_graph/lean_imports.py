"""Keep the modules this service never uses out of its Ray Serve processes.

`import ray.serve` imports pandas, and pyarrow through it, only to register a JSON encoder for
DataFrames, and does without it when the import fails (`ray/serve/_private/utils.py`:
`try: import pandas ... except ImportError: pd = None`). Nothing this service runs in a Serve
process uses a DataFrame, yet that import costs 0.25–0.45 CPU-s (by CPU) in each of the
seven processes that import Serve (the launcher, the controller, the proxy, four replicas;
benchmarks/RESULTS.md), on a 2-core machine while they all start together.

`refuse()` makes such an import fail in this process; the launcher calls it before it imports
Ray Serve, and `refuse_in_workers()` before it starts its local Ray, so that every Ray worker
runs it before it imports anything else. Batch mode (Ray Data, which does use pandas and
pyarrow) starts its own Ray and never calls either.

The workers get it as Ray's worker setup hook, but through the environment they inherit from
the raylet (as a Ray job's workers inherit it from the job's supervisor), not through a job
`runtime_env`: with one, every worker's start waits on Ray's runtime-env agent, which on a
busy 2-core machine costs more than pandas saves (benchmarks/RESULTS.md, 2026-12-03 and
2026-12-06).
"""
import importlib.abc
import os
import sys

UNUSED = ("pandas",)  # top-level packages refused; their submodules with them
SETUP_HOOK = f"{__name__}.refuse"  # what Ray's workers call (`refuse_in_workers`)


class Refused(importlib.abc.MetaPathFinder):
    """A finder, first on `sys.meta_path`, that makes importing an `UNUSED` package fail."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in UNUSED:
            raise ImportError(f"{name} is kept out of this process (serve_graph.lean_imports)",
                              name=name)
        return None


def refuse() -> None:
    """Refuse the `UNUSED` packages in this process from now on (once; idempotent). A package
    already imported stays."""
    if not any(isinstance(finder, Refused) for finder in sys.meta_path):
        sys.meta_path.insert(0, Refused())


def refuse_in_workers() -> None:
    """Make every Ray worker started by a Ray that this process starts from now on run
    `refuse` first: Ray's worker setup hook, set in the environment they inherit."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    os.environ[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] = SETUP_HOOK
