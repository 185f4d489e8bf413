"""What the middleware and the schema read of this Ingress replica's settings (`settings`),
set by `configure` from `Ingress.__init__`.

Module-level on purpose: `@serve.ingress(app)` serves a frozen copy of `app`, made when the
deployment class is decorated, so middleware must be registered before that and cannot read
`app.state`.
"""
import types

from ..access import ApiKeys, ByteBudget, ConcurrencyLimit
from ..settings import ServiceSettings

settings = types.SimpleNamespace(max_upload_bytes=None, api_keys=None, limit=None,
                                 cors_origins=(), models=(), upload_budget=ByteBudget(0))


def configure(service: ServiceSettings) -> None:
    """Set `settings` from the replica's. A module function, so that the call from
    `Ingress.__init__` (whose class Serve may pickle by value, copying the globals it names)
    reaches this module's `settings` in the replica."""
    settings.max_upload_bytes = service.max_upload_bytes
    settings.api_keys = ApiKeys(service.api_keys_file)
    settings.limit = ConcurrencyLimit(service.max_concurrent_per_client)
    settings.cors_origins = service.cors_origins
    settings.models = service.served_models
    settings.upload_budget = ByteBudget(int(service.max_upload_memory_mb * 2**20))


def this_replica():
    """The `Ingress` instance serving this request: what the routes take as a dependency
    (`Depends(this_replica)`), as Ray Serve's class-based routes do."""
    from ray import serve
    return serve.get_replica_context().servable_object
