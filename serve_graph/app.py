"""The deployment graph, built once: Ingress -> Decode, then Ingress -> Encode, which runs the
song's windows through Separate (batched across songs) and encodes the stems as they finish.

`serve run serve_config.yaml` imports `serve_graph.app:build_app` and passes the config's `args`;
the launcher (`serve_graph.serve_run`) builds the same graph in its own process with `graph`.
"""
import typing as tp

from ray.serve import Application

from .decode import Decode
from .encode import Encode
from .engine import ModelNotFoundError
from .ingress import Ingress
from .preflight import local_serve_run, model_message, precision_message, stop_local_serve_run
from .separate import Separate
from .settings import ServiceSettings


def build_app(args: tp.Optional[dict] = None) -> Application:
    """The application for `args` (see `ServiceSettings`): model, model_repo, device,
    precision, upload and duration limits. In Serve's build task: a precision this CPU lacks
    fails the build, and so does a missing model when a local `serve run` started it (that
    `serve run` is stopped with the message)."""
    settings = ServiceSettings.from_args(args)
    problem = precision_message(settings)
    if problem is not None:  # Separate's replicas would fail to start, again and again
        stop_local_serve_run(problem)
        raise ValueError(problem)
    if local_serve_run() is not None:  # one machine, started by this `serve run`
        problem = model_message(settings)
        if problem is not None:
            stop_local_serve_run(problem)
            raise ModelNotFoundError(problem)
    return _bound(settings)


def graph(args: tp.Optional[dict], overrides: tp.Mapping[str, dict]) -> Application:
    """The application for `args`, each deployment with `overrides[its name]`: the options
    serve_config.yaml's `deployments` give it (`num_replicas`, `ray_actor_options`,
    `user_config`...), as Serve applies them to a config's application."""
    return _bound(ServiceSettings.from_args(args), overrides)


def _bound(settings: ServiceSettings, overrides: tp.Mapping[str, dict] = {}) -> Application:
    def placed(deployment):
        return deployment.options(**overrides.get(deployment.name, {}))
    separate = placed(Separate).bind(settings)
    return placed(Ingress).bind(placed(Decode).bind(settings), separate,
                                placed(Encode).bind(separate, settings), settings)
