"""The cold start by phase, as a new user meets it: `python -m serve_graph serve` from nothing
to `GET /readyz` 200, then the first and second 30 s song.

Phases, from the service's own log (timestamps of one machine's clock) and this script's clock:
launcher (process start -> `serve run` running its config), Ray up, Serve up (its controller;
before 2026-12-06 with its HTTP proxy), app built (the graph built from the config), the HTTP
proxy ready (since 2026-12-06 it starts beside the replicas), each replica ready (its
`__init__` done: `launch.READY`), `/readyz` 200, the first and the second 30 s song to MP3
stems (their difference is what start-up left to the first request).

    python -m benchmarks.cold_start --size tiny --repeats 3
    python -m benchmarks.cold_start --size full --repeats 1
    python -m benchmarks.cold_start --before /tmp/before   # a checkout of the code before a
                                                           # change: runs alternate, one table
    python -m benchmarks.cold_start --before . --before-python other/venv/bin/python
    python -m benchmarks.cold_start --path modal   # as a Modal container starts (below)

`--path modal` starts what a Modal container runs, on this machine's CPUs: `modal_deploy.app`'s
`start_service` (serve_config.yaml placed by `serve_graph.placement`, the same launcher), then
its `wait_ready`, whose return is when Modal would route the first request ("Modal ready");
the launcher's phase then includes importing Modal's client and the app module, as the
container's own Python does before it.
"""
import argparse
import datetime
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import requests
import soundfile as sf

from benchmarks.common import CACHE, append_results, full_size_repo, song
from serve_graph.engine import make_random_repo
from serve_graph.launch import READY
from serve_graph.procs import stop_tree

STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
# (phase, what marks its end in the log): the first line containing one of the texts (the
# code before a change may say it otherwise: `--before`)
LOG_PHASES = (("launcher", ("Running config file",)),
              ("Ray up", ("Started a local Ray instance",)),
              ("Serve up", ("Started Serve in namespace", "Started Serve's controller")),
              ("app built", ("Imported and built app",)),
              ("HTTP proxy ready", ("Started Serve in namespace", "HTTP proxy ready")),
              ("Modal ready", ("wait_ready returned",)))
# what `--path modal` runs: a Modal container's start-up (its `web`), stopped by SIGINT as the
# local service is; argv: the port
MODAL_CONTAINER = """\
import signal, sys, time
from modal_deploy.app import start_service, wait_ready
port = int(sys.argv[1])
service = start_service(port=port, gpus=0)
try:
    wait_ready(service, port)
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    print(f"{stamp},{int(now % 1 * 1000):03d} wait_ready returned", flush=True)
    service.wait()
except KeyboardInterrupt:
    service.send_signal(signal.SIGINT)
    service.wait(120)
"""
DEPLOYMENTS = ("Ingress", "Decode", "Encode", "Separate")


def tiny_repo() -> Path:
    repo = CACHE / "htdemucs_tiny"
    if not (repo / "htdemucs.yaml").is_file():
        make_random_repo(repo, "htdemucs", size="tiny", seed=0)
    return repo


def _stamp(line: str) -> tp.Optional[float]:
    found = STAMP.search(line)
    if not found:
        return None
    moment = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return moment.timestamp()  # Ray logs local time, as datetime reads it


def log_phases(log: str, started: float) -> tp.Dict[str, float]:
    """Seconds from `started` (epoch) to each phase's end in `serve run`'s log."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines()
    found: tp.Dict[str, float] = {}
    for phase, markers in LOG_PHASES:
        moment = next((_stamp(line) for line in lines
                       if any(marker in line for marker in markers)), None)
        if moment is not None:
            found[phase] = moment - started
    for name in DEPLOYMENTS:
        tag = f"ServeReplica:separation:{name} "
        moment = next((_stamp(line) for line in lines if tag in line and READY in line), None)
        if moment is not None:
            found[f"{name} ready"] = moment - started
    return found


def separate_once(url: str, wav: bytes) -> float:
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("song.wav", wav)},
                             data={"format": "mp3"}, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start


ROOT = Path(__file__).resolve().parents[1]


def start_command(path: str, python: str, port: int, repo: Path) -> tp.List[str]:
    """The command that starts the service by `path` ("serve": `python -m serve_graph serve`,
    as a user does; "modal": as a Modal container does)."""
    if path == "modal":
        return [python, "-c", MODAL_CONTAINER, str(port)]
    return [python, "-m", "serve_graph", "serve", "--port", str(port), "--model-repo", str(repo)]


def one_start(repo: Path, port: int, wavs: tp.Sequence[bytes], timeout: float,
              tree: Path = ROOT, python: str = sys.executable,
              path: str = "serve") -> tp.Dict[str, float]:
    """One cold start of the code in `tree` (a checkout of this repository: the launcher runs
    there, and it and every Ray process import `serve_graph` from it) with interpreter
    `python`; phases in seconds from the launcher's process start. The two songs `wavs` are
    different songs of one length: the second is not answered from the result cache."""
    folder = Path(tempfile.mkdtemp(prefix="cold_start_"))
    log_path = folder / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        started = time.time()
        process = subprocess.Popen(
            start_command(path, python, port, repo), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree), "RAY_DEDUP_LOGS": "0",  # every line
                 "SERVE_GRAPH_MODEL_REPO": str(repo)})
        try:
            ready = _wait_ready(url, process, started + timeout)
            if path == "modal":  # its wait_ready polls more slowly than this script
                _wait_logged(log_path, "wait_ready returned", process, started + timeout)
            figures = {**log_phases(log_path.read_text(errors="replace"), started),
                       "/readyz 200": ready - started}
            figures["first song"] = separate_once(url, wavs[0])
            figures["second song"] = separate_once(url, wavs[1])
        finally:
            stopping = time.perf_counter()
            stop_tree(process, signal.SIGINT)
    figures["stop"] = time.perf_counter() - stopping
    return figures


def _wait_logged(log: Path, text: str, process: subprocess.Popen, deadline: float) -> None:
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the service did not log {text!r}")
        time.sleep(0.05)


def _wait_ready(url: str, process: subprocess.Popen, deadline: float) -> float:
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return time.time()
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError("the service was not ready in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--before", type=Path,
                        help="a checkout of the code before a change: its cold starts alternate "
                             "with this tree's, and the table has both")
    parser.add_argument("--before-python", default=sys.executable,
                        help="the interpreter of the before runs (another environment)")
    parser.add_argument("--note", default="", help="what this run measures (e.g. the change)")
    parser.add_argument("--path", default="serve", choices=["serve", "modal"],
                        help="started as a user does (python -m serve_graph serve) or as a "
                             "Modal container does (modal_deploy.app: start_service, wait_ready)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: the service stopped too
    repo = tiny_repo() if args.size == "tiny" else full_size_repo()
    wavs = []
    for seed in (0, 1):
        buffer = io.BytesIO()
        sf.write(buffer, song(30, seed=seed).numpy().T, 44100, format="WAV", subtype="PCM_16")
        wavs.append(buffer.getvalue())
    trees = ({"before": (args.before.resolve(), args.before_python),
              "after": (ROOT, sys.executable)} if args.before else {"": (ROOT, sys.executable)})
    runs: tp.Dict[str, tp.List[tp.Dict[str, float]]] = {label: [] for label in trees}
    for _ in range(args.repeats):
        for label, (tree, python) in trees.items():
            runs[label].append(one_start(repo, args.port, wavs, args.timeout, tree, python,
                                         args.path))
    started_by = ("as a Modal container starts it (`modal_deploy.app`: start_service with no "
                  "GPU, wait_ready)" if args.path == "modal" else "`python -m serve_graph serve`")
    lines = [f"- started: {started_by}",
             f"- model: {args.size} htdemucs (random weights); {args.repeats} cold starts "
             f"of each tree, alternating; seconds from the launcher's process start (songs and "
             f"stop: their own duration){'; ' + args.note if args.note else ''}"]
    if args.before:
        lines.append(f"- before: `{args.before}` at `{_commit(args.before)}` with "
                     f"`{args.before_python}`; after: `{_commit(ROOT)}` and its working tree "
                     f"with `{sys.executable}`")
    lines += table(runs)
    where = ", Modal's path" if args.path == "modal" else ""
    append_results(f"Cold start by phase ({args.size} model{where})", lines)


def _commit(tree: Path) -> str:
    found = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
    return found.stdout.strip() or "?"


def table(runs: tp.Dict[str, tp.List[tp.Dict[str, float]]]) -> tp.List[str]:
    """A row per phase: each run's seconds and the median, per tree."""
    phases = list(dict.fromkeys(key for label in runs for run in runs[label] for key in run))
    head, rule = ["phase"], ["---"]
    for label, label_runs in runs.items():
        head += [f"{label} {i + 1}".strip() for i in range(len(label_runs))]
        head.append(f"{label} median".strip())
        rule += ["---"] * (len(label_runs) + 1)
    lines = ["", "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for phase in phases:
        cells = [phase]
        for label_runs in runs.values():
            values = [run.get(phase) for run in label_runs]
            known = [value for value in values if value is not None]
            cells += [f"{value:.2f}" if value is not None else "—" for value in values]
            cells.append(f"{statistics.median(known):.2f}" if known else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
