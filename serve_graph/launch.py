"""Start the service from serve_config.yaml the way `serve run` does, with overrides.

Used by `python -m serve_graph serve`, by the Modal container and by the tests, so every one of
them runs the same config through the same `build_app`.
"""
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import typing as tp
from pathlib import Path

import yaml

from .procs import age

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def write_config(path: tp.Union[str, Path], source: tp.Union[str, Path] = DEFAULT_CONFIG,
                 **overrides) -> Path:
    """Write `source` to `path` with `overrides` (see `configured`)."""
    Path(path).write_text(yaml.safe_dump(configured(source, **overrides), sort_keys=False))
    return Path(path)


def configured(source: tp.Union[str, Path] = DEFAULT_CONFIG, port: tp.Optional[int] = None,
               host: tp.Optional[str] = None, args: tp.Optional[dict] = None,
               deployments: tp.Optional[tp.Dict[str, dict]] = None) -> dict:
    """The Serve config in `source` with another HTTP port/host, application `args` and
    per-deployment overrides (`{"Separate": {"num_replicas": 2, "user_config": {...}}}`;
    dict values are merged one level deep)."""
    config = yaml.safe_load(Path(source).read_text())
    if port is not None:
        config["http_options"]["port"] = port
    if host is not None:
        config["http_options"]["host"] = host
    application = config["applications"][0]
    application["args"].update(args or {})
    for deployment in application["deployments"]:
        for key, value in (deployments or {}).get(deployment["name"], {}).items():
            if isinstance(value, dict) and isinstance(deployment.get(key), dict):
                deployment[key] = {**deployment[key], **value}
            else:
                deployment[key] = value
    return config


def serve_command(config: tp.Union[str, Path]) -> tp.List[str]:
    """`serve run <config>` with this interpreter's Ray, its local Ray without the dashboard
    (`serve_graph.serve_run`)."""
    return [sys.executable, "-m", "serve_graph.serve_run", str(config)]


# Ray takes 127.0.0.1 as the node's address with this (as it does on macOS), and then binds its
# servers there instead of on every interface.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_replica_server_on_loopback() -> None:
    """In a replica of a Ray kept on loopback (`LOOPBACK_RAY`, inherited from `launch`), bind
    Serve's inter-deployment gRPC server to 127.0.0.1 too: Ray Serve binds it to `[::]:0`
    whatever the node's address (`ray/serve/_private/replica.py`). Call from a deployment's
    `__init__`, which runs before Serve starts that server."""
    if not os.environ.items() >= LOOPBACK_RAY.items():
        return
    from ray.serve._private import replica
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "on_loopback", False):
        return

    def bind_on_loopback(server, address: str):
        return bind(server, address.replace("[::]:", "127.0.0.1:", 1))

    bind_on_loopback.on_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_on_loopback


READY = "replica ready"  # the log line benchmarks/cold_start.py times each replica by

# How often a stopping replica looks whether its requests are done (every deployment's
# `graceful_shutdown_wait_loop_s`). Serve's default, 2 s, is also what an idle replica waits
# before it stops, and Serve stops the graph's deployments one after another: ~6 s of every
# service's stop (benchmarks/RESULTS.md). Requests in flight are still waited for, up to
# `graceful_shutdown_timeout_s`.
SHUTDOWN_POLL_S = 0.2


def log_replica_ready(logger: logging.Logger) -> None:
    """Log, at the end of a deployment's `__init__`, that this replica is ready and how long
    after its process started (worker start, imports, model loading): the cold start by
    replica."""
    logger.info("%s, %.2f s after its process started", READY, age(os.getpid()))


RAY_WORKER_PORTS_END = 19999  # Ray's workers listen on 10002-19999 by default


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a service to be started here (tests, benchmarks): free now, and one nothing
    takes by chance before the service binds it: above Ray's worker ports and below the
    kernel's ephemeral range, where every bind to port 0 and the source port of every outgoing
    connection land (Ray's processes open hundreds while the service starts, and Serve's HTTP
    proxy binds beside the replicas starting)."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral_start = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for _ in range(100):
        port = random.randrange(RAY_WORKER_PORTS_END + 1, max(ephemeral_start, 20001))
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def ray_environment(config: tp.Union[str, Path], env: tp.Mapping[str, str]) -> dict:
    """`env` with what keeps a Ray started here on loopback, unless the config's `cluster`
    arg is true or `RAY_ADDRESS` names a cluster to join (its node address must be real)."""
    args = yaml.safe_load(Path(config).read_text())["applications"][0]["args"]
    if args.get("cluster") or env.get("RAY_ADDRESS"):
        return dict(env)
    return {**env, **LOOPBACK_RAY}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(config: tp.Union[str, Path] = DEFAULT_CONFIG, env: tp.Optional[dict] = None,
           **popen) -> subprocess.Popen:
    """Start `serve run <config>` in the background (own process group) and return it; Ray's
    ports on 127.0.0.1 unless the config says `cluster: true`. It runs in the config's folder
    unless `popen` names another `cwd`. `serve run` stops on SIGINT (Serve shut down, Ray's
    processes with it) even where this process ignores SIGINT, as a script's `cmd &` does:
    an ignored signal would stay ignored in the child."""
    full_env = ray_environment(config, dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
                                            **(env or {})))
    popen.setdefault("cwd", Path(config).resolve().parent)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        popen.setdefault("preexec_fn", _default_sigint)
    return subprocess.Popen(serve_command(config), env=full_env, start_new_session=True,
                            **popen)


DEPLOY_FAILED = "failed with exception"  # Serve's controller: "Deploying app 'x' failed with..."


def deploy_failure(log: tp.Union[str, Path]) -> tp.Optional[str]:
    """The end of `serve run`'s log from Serve's word that the application failed to deploy
    (an import error, a bad arg), or None. `serve run` itself keeps running and retrying then,
    so a caller waiting for the service to answer would wait out its whole timeout."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", Path(log).read_text(errors="replace"))  # colours
    at = text.find(DEPLOY_FAILED)
    return None if at < 0 else text[max(0, at - 200):at + 8000]
