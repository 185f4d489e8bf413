"""Fail fast and clearly when the model cannot be loaded, before Ray Serve starts retrying.

`serve run serve_config.yaml` deploys the config and then waits forever, whatever happens to the
deployments; a Separate replica that cannot load its model would be retried in a loop, its
message buried in tracebacks. So `build_app` checks the model first. When the cluster is the
local one that this `serve run` started (its raylet is a child of the `serve run` process), the
check prints one clear message on that terminal and stops `serve run` (non-zero exit) and
the Ray processes it started. On a real cluster nothing is stopped: the
application deploys and `GET /readyz` reports the missing model.
"""
import os
import signal
import socket
import sys
import time
import typing as tp
from pathlib import Path

from .engine.cpu_settings import precision_problem
from .engine.errors import ModelNotFoundError
from .engine.model_files import weights_problem
from .engine.modes import modes_problem
from .procs import alive, cmdline, descendants, parent, wait_gone

if tp.TYPE_CHECKING:
    from .settings import ServiceSettings

TRY_WITHOUT_WEIGHTS = (
    "To try the service without the real weights, make a model repo with random weights and "
    "point the service at it:\n"
    "    python -m serve_graph make-repo models\n"
    "    SERVE_GRAPH_MODEL_REPO=models python -m serve_graph serve")


def model_problem(name: str, repo: tp.Optional[str]) -> tp.Optional[str]:
    """None when model `name`'s weight files are in place (in `repo`, or in Demucs' caches,
    or downloaded now by Demucs where it can); else the reason, naming the missing file and
    where it goes. Only a download imports torch and Demucs here: the check runs on the
    path of every start (the launcher, Serve's build task)."""
    problem = weights_problem(name, repo)
    if problem is None or repo is not None:
        return problem
    from .engine.models import load_model  # Demucs' loader: downloads what it can
    try:
        load_model(name, None)
    except ModelNotFoundError as exc:
        return str(exc)
    return None


def on_this_cpu(device: str) -> bool:
    """Whether a model of `device` runs on this machine's CPU: "cpu", or "auto" without an
    NVIDIA GPU here (no torch imported)."""
    return device == "cpu" or (device == "auto" and not any(Path("/dev").glob("nvidia[0-9]*")))


def cpu_precision_problem(device: str, precision: str) -> tp.Optional[str]:
    """Why `precision` cannot run at speed where the model runs on this machine's CPU; None
    otherwise."""
    return precision_problem(precision) if on_this_cpu(device) else None


def missing_model_message(name: str, problem: str) -> str:
    return (f"\nerror: the model {name!r} cannot be loaded, so the service cannot start.\n"
            f"{problem}\n\n{TRY_WITHOUT_WEIGHTS}\n")


def local_serve_run() -> tp.Optional[int]:
    """The PID of the `serve run` process (Ray's, or `serve_graph.serve_run`) that started the
    Ray cluster this worker belongs to, or None (a cluster started otherwise, or not Linux)."""
    raylet = parent(os.getpid())
    if not any(part.endswith("raylet") for part in cmdline(raylet)[:1]):
        return None
    driver = parent(raylet)
    args = cmdline(driver)
    if "serve_graph.serve_run" in args[:3]:
        return driver
    is_serve = any(Path(a).name == "serve" or a == "ray.serve.scripts" for a in args[:3])
    return driver if is_serve and "run" in args else None


def stop_local_serve_run(message: str, wait: float = 60.) -> bool:
    """Print `message` on the terminal of the local `serve run` and stop it, waiting up to
    `wait` s for the cluster to take this process down too (so that no retry and no traceback
    follow the message). False, at once, when this is not such a cluster."""
    driver = local_serve_run()
    if driver is None:
        return False
    cluster = [pid for pid in descendants(parent(os.getpid())) if pid != os.getpid()]
    try:
        with open(f"/proc/{driver}/fd/2", "a") as terminal:  # its stderr: the user's terminal
            terminal.write(message)
    except OSError:
        print(message, file=sys.stderr, flush=True)
    # SIGHUP ends `serve run` with a non-zero status and, unlike SIGTERM, without Ray's stack
    # dump after the message; its raylet and GCS follow it, and the agents and workers that the
    # raylet started are stopped here, by PID.
    os.kill(driver, signal.SIGHUP)
    if wait_gone([driver], 2.):  # SIGHUP ignored (`nohup serve run ...`): no stack dump either
        os.kill(driver, signal.SIGKILL)
    for pid in cluster:  # at once: this worker ends with the raylet
        if alive(pid):
            os.kill(pid, signal.SIGKILL)  # Ray's agents outlive a SIGTERM once the raylet is gone
    wait_gone([driver], wait)
    time.sleep(wait)  # the raylet's end ends this worker: no retry, no traceback
    return True


def settings_problem(args: tp.Optional[dict]) -> tp.Optional[str]:
    """What stops a start on this machine before anything deploys, as the message to print:
    a precision this CPU lacks, a run mode it cannot run, or (with `require_model`) a missing
    model; None when there is none. Raises ValueError for args the service does not know, or
    bad values (`ServiceSettings`)."""
    from .settings import ServiceSettings
    settings = ServiceSettings.from_args(args)
    return precision_message(settings) or modes_message(settings) or model_message(settings)


def port_message(http_options: tp.Optional[dict]) -> tp.Optional[str]:
    """The message to print when the HTTP address the config names (`http_options`, Serve's
    defaults 127.0.0.1:8000) is taken on this machine, by another service or an earlier start
    still running; None when it is free. Bound here as Serve's proxy binds it (SO_REUSEADDR), so
    that a start that cannot serve ends at once instead of once everything else has started."""
    host = (http_options or {}).get("host") or "127.0.0.1"
    port = int((http_options or {}).get("port") or 8000)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return (f"\nerror: the service cannot listen on {host}:{port}: {exc.strerror}. "
                    f"Another service, or this one started earlier, holds it: stop it, or "
                    f"choose another port (--port, or http_options.port in the config).\n")
    return None


def precision_message(settings: "ServiceSettings") -> tp.Optional[str]:
    problem = cpu_precision_problem(settings.device, settings.precision)
    return None if problem is None else f"\nerror: {problem}\n"


def modes_message(settings: "ServiceSettings") -> tp.Optional[str]:
    """Why the model cannot run as `settings` say on this machine (the fused DConv kernels on
    its CPU), as the message to print; None otherwise. For a start on this machine only: on a
    cluster the replicas may run where the GPUs are."""
    problem = modes_problem(settings.precision, settings.compile, settings.group_norm,
                            settings.dconv, on_cpu=on_this_cpu(settings.device))
    return None if problem is None else f"\nerror: {problem}\n"


def model_message(settings: "ServiceSettings") -> tp.Optional[str]:
    if not settings.require_model:
        return None
    problem = model_problem(settings.model, settings.model_repo)
    return None if problem is None else missing_model_message(settings.model, problem)
