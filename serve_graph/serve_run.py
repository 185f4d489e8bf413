"""`serve run <config>` as `launch` starts it, lighter on the local machine:

- Ray's dashboard (its web server and the nine module processes behind it) is left out: this
  service does not use it, and on a 2-core machine those processes take CPU from the replicas
  starting beside them. Each node's agent, which serves the metrics `GET /metrics` relays,
  still runs. `SERVE_GRAPH_RAY_DASHBOARD=1` keeps the dashboard.
- The application is built here, in this process, from the config (its `args`, and its
  `deployments` as `.options()` of each deployment), while Ray starts: Serve's own `serve run`
  of a config file instead hands the build to a task in a new Ray worker, which imports the
  graph (Ray Serve, FastAPI, this package) once more after Serve is up (~1.5 s of the cold
  start on 2 cores; benchmarks/RESULTS.md). The checks that a missing model or a precision the
  CPU lacks stop the start with one message happen here too, before Ray starts.
- This process and the Serve processes of its Ray import Ray Serve without pandas, which only
  Serve's DataFrame encoder would use (`lean_imports`).
- The application is deployed as soon as Serve's controller is up; its HTTP proxy starts beside
  the replicas (`_start_serve`), and Ray's processes retry a refused local connection every
  50 ms instead of after 1 s (`RAYLET_CONNECT_RETRY`).

A Ray to join (`RAY_ADDRESS`, a cluster), a config of other applications, or an application
with its own `runtime_env` goes through Ray's `serve run` unchanged.

    python -m serve_graph.serve_run serve_config.yaml
"""
import concurrent.futures
import os
import signal
import sys
import threading
import time
import typing as tp

import yaml

DASHBOARD_ENV = "SERVE_GRAPH_RAY_DASHBOARD"
IMPORT_PATH = "serve_graph.app:build_app"  # the application built in this process
# Serve's controller says this when an application cannot be deployed; said here too, so that
# `launch.deploy_failure` reads both the same way
DEPLOY_FAILED = "Deploying app '{}' failed with exception:\n{}"
# The raylet's first connection to its own object store often comes before the store listens
# (a thread of the same process), and Ray tries again only after 1 s
# (`raylet_client_connect_timeout_milliseconds`): ~1 s of 7 in 18 local starts measured
# (benchmarks/RESULTS.md). Tried again every 50 ms instead, 10 s in all as before; Ray's
# processes read these from the environment they inherit. A value already set is kept.
RAYLET_CONNECT_RETRY = {"RAY_raylet_client_connect_timeout_milliseconds": "50",
                        "RAY_raylet_client_num_connect_attempts": "200"}


def retry_local_connections_quickly() -> None:
    """Make the Ray this process starts next retry its processes' refused local connections
    every 50 ms (`RAYLET_CONNECT_RETRY`), unless the environment says otherwise."""
    for name, value in RAYLET_CONNECT_RETRY.items():
        os.environ.setdefault(name, value)


def ray_address() -> str:
    """The Ray to start or join: RAY_ADDRESS's (a cluster; "auto": a Ray already running on
    this machine), else "local", a new one. A bare `ray.init()` would join the cluster that a
    `ray start` (or a test's `ray.cluster_utils.Cluster`) on this machine wrote to Ray's
    `ray_current_cluster` file: someone else's, or one long gone."""
    return os.environ.get("RAY_ADDRESS") or "local"


def init_ray(**options) -> None:
    """`ray.init` at `ray_address`: a new local Ray, its processes connecting to each other
    without Ray's 1 s retry (`RAYLET_CONNECT_RETRY`), unless RAY_ADDRESS names one to join.
    `options`: `ray.init`'s others. The launcher's and the batch's Ray."""
    import ray
    if ray_address() == "local":
        retry_local_connections_quickly()
    ray.init(address=ray_address(), **options)


def start_local_ray() -> None:
    """Start a new local Ray (`init_ray`), as `serve run` would, without the dashboard unless
    asked."""
    from ray.serve._private.constants import SERVE_NAMESPACE
    init_ray(namespace=SERVE_NAMESPACE, include_dashboard=os.environ.get(DASHBOARD_ENV) == "1")


def main(argv: tp.Sequence[str]) -> int:
    config = _built_here(argv)
    if config is None:
        return _ray_serve_run(argv)
    _log(f"Running config file: {argv[0]!r}, building the application in this process")
    application = config["applications"][0]
    try:
        from .preflight import port_message, settings_problem  # light: the graph's modules
        problem = (settings_problem(application.get("args"))  # load beside Ray
                   or port_message(config.get("http_options")))
    except ValueError as exc:  # an arg the service does not know, or a bad value
        _log(DEPLOY_FAILED.format(application["name"], exc))
        return 1
    if problem is not None:
        print(problem, file=sys.stderr, flush=True)
        return 2
    return _serve_here(config)


def _built_here(argv: tp.Sequence[str]) -> tp.Optional[dict]:
    """The config, when this process builds its application: a local Ray, one application of
    this package's graph, no runtime_env of its own; else None."""
    if os.environ.get("RAY_ADDRESS") or len(argv) != 1 or not os.path.isfile(argv[0]):
        return None
    with open(argv[0]) as file:
        config = yaml.safe_load(file)
    applications = config.get("applications") or []
    if len(applications) != 1 or applications[0].get("import_path") != IMPORT_PATH or \
            applications[0].get("runtime_env"):
        return None
    return config


def _ray_serve_run(argv: tp.Sequence[str]) -> int:
    """Ray's own `serve run` (its build task), on a local Ray without the dashboard when no
    cluster is given."""
    if not os.environ.get("RAY_ADDRESS"):
        _log(f"Running config file: {argv[0]!r}, starting a local Ray without its dashboard")
        start_local_ray()  # `serve run` then uses this Ray instead of starting its own
    from ray.serve.scripts import cli
    cli.main(["run", *argv], prog_name="serve")
    return 0


def _serve_here(config: dict) -> int:
    """Start Ray (the graph's modules imported meanwhile), Serve with the config's HTTP options,
    the application built here; then serve until SIGINT or SIGTERM, and shut Serve down."""
    from . import lean_imports
    lean_imports.refuse()  # before Ray Serve's first import
    import ray  # whole, before a second thread imports what depends on it
    import ray.serve  # noqa: F401
    importing = threading.Thread(target=_import_graph, name="import-graph")
    importing.start()
    lean_imports.refuse_in_workers()  # of the Ray started next
    start_local_ray()
    importing.join()
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from .app import graph
    schema = ServeDeploySchema.model_validate(config)  # Ray Serve's own check of the file
    proxies = _start_serve(schema)
    application = schema.applications[0]
    overrides = {deployment.name: deployment.model_dump(exclude_unset=True, exclude={"name"})
                 for deployment in application.deployments}
    app = graph(application.args, overrides)
    _log(f"Imported and built app '{application.name}' successfully.")
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stop)
    try:
        serve.run(app, name=application.name, route_prefix=application.route_prefix)
        problem = proxies.result()
        if problem:
            _log(DEPLOY_FAILED.format(application.name, problem))
            return 1
        _log(f"Deployed app '{application.name}' successfully.")
        while True:
            time.sleep(10)
    except RuntimeError as exc:  # Serve gave the deployment up (replicas failing to start)
        _log(DEPLOY_FAILED.format(application.name, exc))
        return 1
    except KeyboardInterrupt:
        _log("Got KeyboardInterrupt, shutting down...")
        return 0
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.SIG_IGN)  # the stop is not cut short
        serve.shutdown()


def _start_serve(schema) -> "concurrent.futures.Future[tp.Optional[str]]":
    """Serve's controller started as `serve.start` starts it, without waiting for its HTTP
    proxy: the proxy's process starts beside the replicas' instead of before them (~0.45 s of
    the cold start on 2 cores; benchmarks/RESULTS.md). Returns the proxies' verdict to come
    (`_proxies_problem`, on a thread: logged when they are ready). Serve's own steps, from
    `ray.serve._private.api.serve_start`, which waits for the proxies first."""
    from ray.serve._private import api as serve_api
    from ray.serve._private.client import ServeControllerClient
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.context import _set_global_client
    controller, proxies_ready = serve_api._create_controller_and_proxy_refs(
        schema.http_options.model_dump(), None, None, None,
        serve_api._coerce_controller_options(None), schema.proxy_location)
    _set_global_client(ServeControllerClient(controller))
    _log(f"Started Serve's controller in namespace \"{SERVE_NAMESPACE}\"; its HTTP proxy "
         "starts beside the application.")
    watching = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="proxies")
    verdict = watching.submit(_proxies_problem, proxies_ready)
    watching.shutdown(wait=False)
    return verdict


def _proxies_problem(proxies_ready: list) -> tp.Optional[str]:
    """None once every HTTP proxy is ready (Serve's own timeout), else why not."""
    import ray
    from ray.serve._private.constants import HTTP_PROXY_TIMEOUT
    try:
        ray.get(proxies_ready, timeout=HTTP_PROXY_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        return f"HTTP proxies not available after {HTTP_PROXY_TIMEOUT}s."
    except ray.exceptions.RayError as exc:  # its cause last (e.g. the port taken)
        return f"the HTTP proxy did not start: {str(exc).strip().splitlines()[-1]}"
    _log("HTTP proxy ready.")
    return None


def _import_graph() -> None:
    import serve_graph.app  # noqa: F401  (torch-free: the replicas import what they need)


def _stop(signum, frame):
    raise KeyboardInterrupt


def _log(message: str) -> None:
    """A line on stderr stamped as Ray stamps its own (`benchmarks/cold_start.py` reads it)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    print(f"{stamp},{int(now % 1 * 1000):03d}\tINFO serve_run.py -- {message}", file=sys.stderr,
          flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
