"""A new local Ray's start alone (`ray.init` without the dashboard, as the launcher and
`batch` start it: `serve_run.init_ray`), with Ray's default 1 s retry of a refused local
connection and with the 50 ms retry of `serve_graph.serve_run.RAYLET_CONNECT_RETRY`; runs
alternate, each in a fresh process.

    python -m benchmarks.ray_start --repeats 6
"""
import argparse
import os
import statistics
import subprocess
import sys
import typing as tp

from benchmarks.common import append_results
from serve_graph.serve_run import RAYLET_CONNECT_RETRY

ONE_START = """\
import time
import ray
start = time.perf_counter()
ray.init(address="local", include_dashboard=False, logging_level="WARNING")
print(f"SECONDS {time.perf_counter() - start:.3f}", flush=True)
ray.shutdown()
"""


def one_start(quick_retry: bool) -> float:
    env = {name: value for name, value in os.environ.items() if name not in RAYLET_CONNECT_RETRY}
    if quick_retry:
        env.update(RAYLET_CONNECT_RETRY)
    done = subprocess.run([sys.executable, "-c", ONE_START], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return float(done.stdout.split("SECONDS")[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    runs: tp.Dict[str, tp.List[float]] = {"Ray's 1 s retry": [], "50 ms retry": []}
    for _ in range(args.repeats):
        for label in runs:
            runs[label].append(one_start(label == "50 ms retry"))
    lines = [f"- {args.repeats} starts of each, alternating; seconds in `ray.init`", "",
             "| retry | " + " | ".join(str(i + 1) for i in range(args.repeats)) + " | median |",
             "|---|" + "---|" * (args.repeats + 1)]
    for label, seconds in runs.items():
        lines.append(f"| {label} | " + " | ".join(f"{s:.2f}" for s in seconds)
                     + f" | {statistics.median(seconds):.2f} |")
    append_results("Local Ray start, the raylet's connection retry", lines)


if __name__ == "__main__":
    main()
