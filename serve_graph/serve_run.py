"""`serve run <config>` as `launch` starts it: Ray's own `serve run`, with the local Ray it
starts lighter. Ray's dashboard (its web server and the nine module processes behind it) is
left out: this service does not use it, and on a 2-core machine those processes take CPU from
the replicas starting beside them. Each node's agent, which serves the metrics `GET /metrics`
relays, still runs. `SERVE_GRAPH_RAY_DASHBOARD=1` keeps the dashboard; a Ray to join
(`RAY_ADDRESS`, a cluster) is joined as `serve run` joins it.

    python -m serve_graph.serve_run serve_config.yaml
"""
import os
import sys
import time
import typing as tp

DASHBOARD_ENV = "SERVE_GRAPH_RAY_DASHBOARD"


def start_local_ray() -> None:
    """Start the local Ray `serve run` would start, without the dashboard unless asked."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE
    ray.init(namespace=SERVE_NAMESPACE, include_dashboard=os.environ.get(DASHBOARD_ENV) == "1")


def main(argv: tp.Sequence[str]) -> None:
    if not os.environ.get("RAY_ADDRESS"):
        _log(f"Running config file: {argv[0]!r}, starting a local Ray without its dashboard")
        start_local_ray()  # `serve run` then uses this Ray instead of starting its own
    from ray.serve.scripts import cli
    cli.main(["run", *argv], prog_name="serve")


def _log(message: str) -> None:
    """A line on stderr stamped as Ray stamps its own (`benchmarks/cold_start.py` reads it)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    print(f"{stamp},{int(now % 1 * 1000):03d}\tINFO serve_run.py -- {message}", file=sys.stderr,
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
