"""The deployment graph, built once: Ingress -> Decode, then Ingress -> Encode, which runs the
song's windows through Separate (batched across songs) and encodes the stems as they finish.

`serve run serve_config.yaml` imports `serve_graph.app:build_app` and passes the config's `args`.
"""
import typing as tp

from ray.serve import Application

from .decode import Decode
from .encode import Encode
from .engine import ModelNotFoundError
from .ingress import Ingress
from .preflight import (cpu_precision_problem, local_serve_run, missing_model_message,
                        model_problem, stop_local_serve_run)
from .separate import Separate
from .settings import ServiceSettings


def build_app(args: tp.Optional[dict] = None) -> Application:
    """The application for `args` (see `ServiceSettings`): model, model_repo, device,
    precision, upload and duration limits."""
    settings = ServiceSettings.from_args(args)
    problem = cpu_precision_problem(settings.device, settings.precision)
    if problem is not None:  # Separate's replicas would fail to start, again and again
        stop_local_serve_run(f"\nerror: {problem}\n")
        raise ValueError(problem)
    if settings.require_model and local_serve_run() is not None:
        # one machine, started by this `serve run`: a missing model ends it now
        problem = model_problem(settings.model, settings.model_repo)
        if problem is not None:
            stop_local_serve_run(missing_model_message(settings.model, problem))
            raise ModelNotFoundError(problem)
    separate = Separate.bind(settings)
    return Ingress.bind(Decode.bind(settings), separate, Encode.bind(separate, settings),
                        settings)
