"""The Ingress deployment: the HTTP front of the graph, a thin class over `serve_graph.api`.

`@serve.ingress` serves `api.app.app`: the routes, error handlers, middleware, schema and
pages, a module per concern. This class holds the replica's state (the handles of the other
deployments, the models seen loaded, the job store and runner); its mixins hold what the routes
ask of it (`api.health.ModelStates`, `api.separation.Separations`, `api.job_routes.JobMethods`).
"""
import asyncio
import logging
import typing as tp
import uuid

from ray import serve
from ray.serve.handle import DeploymentHandle

from .api.app import app
from .api.health import ModelStates
from .api.job_routes import JobMethods
from .api.replica import configure
from .api.separation import Separations
from .job_runner import JobRunner
from .job_store_handle import StoreHandle
from .jobs import job_store
from .launch import SHUTDOWN_POLL_S, keep_replica_server_on_loopback, log_replica_ready
from .messages import ModelHandles
from .result_cache import ResultCache, cache_folder
from .settings import ServiceSettings

logger = logging.getLogger("ray.serve")


def result_cache(settings: ServiceSettings) -> tp.Optional[ResultCache]:
    """The node's result cache (None when `result_cache_mb` is 0): `result_cache_dir`, or a
    folder in the Ray session's directory, which every Ingress replica of the node shares."""
    if not settings.result_cache_mb:
        return None
    return ResultCache(cache_folder(settings.result_cache_dir),
                       int(settings.result_cache_mb * 2**20), settings.result_cache_ttl_s)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1},
                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
@serve.ingress(app)
class Ingress(ModelStates, Separations, JobMethods):
    """Validates the request, then drives the graph: Decode once (the mix goes to the object
    store), then Encode once, which runs the song's windows through Separate and returns the
    ZIP; window outputs never pass through here."""

    def __init__(self, decode: DeploymentHandle, separate: DeploymentHandle,
                 encode: DeploymentHandle, settings: ServiceSettings):
        self._decode, self._separate, self._encode = decode, separate, encode
        keep_replica_server_on_loopback()
        self._settings = settings
        self._default = settings.model
        self._infos: tp.Dict[str, dict] = {}  # the models seen loaded, by name
        self._geometries: tp.Dict[str, tp.Any] = {}
        self._for_model = ModelHandles(separate)  # Separate, routed by model
        self._max_bytes = settings.max_upload_bytes
        self._jobs = StoreHandle(job_store(settings.job_ttl_s, settings.job_storage,
                                           settings.job_limits, settings.webhooks))
        self._cache = result_cache(settings)
        self._runner = JobRunner(self._jobs, uuid.uuid4().hex, settings.jobs_per_replica,
                                 self.run_for_job, self.can_start_jobs)
        configure(settings)
        log_replica_ready(logger)

    async def check_health(self) -> None:
        """Serve's periodic health check: also what starts the job runner of a replica that
        has had no request yet (one that replaced a dead replica takes the queued jobs), and
        what removes the result cache's expired entries while no result is written."""
        self._runner.watch()
        if self._cache is not None and self._cache.sweep_due():
            try:
                await asyncio.to_thread(self._cache.evict)
            except OSError as exc:  # the folder gone or unreadable: not the replica's health
                logger.warning("result cache: expired entries not removed: %s", exc)


__all__ = ["Ingress", "app"]
