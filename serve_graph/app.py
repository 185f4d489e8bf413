"""The deployment graph, built once: Ingress -> Decode -> Separate (batched) -> Encode.

`serve run serve_config.yaml` imports `serve_graph.app:build_app` and passes the config's `args`.
"""
import typing as tp

from ray.serve import Application

from .decode import Decode
from .encode import Encode
from .ingress import Ingress
from .separate import Separate
from .settings import ServiceSettings


def build_app(args: tp.Optional[dict] = None) -> Application:
    """The application for `args` (see `ServiceSettings`): model, model_repo, device,
    precision, upload and duration limits."""
    settings = ServiceSettings.from_args(args)
    separate = Separate.bind(settings)
    return Ingress.bind(Decode.bind(separate, settings), separate, Encode.bind(), settings)
