"""Health, readiness, the models served, metrics and batching stats: the routes that report on
the service (`router`), and what a replica knows of its models (`ModelStates`, a mixin of
`Ingress`)."""
import asyncio
import typing as tp

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from .. import metrics
from ..engine import ModelMissingError, ModelUnavailableError
from .replica import this_replica
from .errors import error

router = APIRouter()
HEALTH_WAIT_S = 2.  # how long GET / waits for a Separate replica before saying "loading"


def object_store_usage() -> dict:
    """Bytes and objects in the Ray object store, from Ray's memory report (cluster-wide)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address
        stats = get_memory_info_reply(get_state_from_address(None)).store_stats
        return {"bytes_used": int(stats.object_store_bytes_used),
                "objects": int(stats.num_local_objects)}
    except Exception as exc:  # noqa: BLE001 - a private API: report, never fail /stats
        return {"unavailable": repr(exc)[:200]}


class ModelStates:
    """What an Ingress replica knows of the models (a mixin of `Ingress`). Needs `_settings`,
    `_default`, `_separate`, `_for_model` (Separate routed by model) and `_infos` (the models
    seen loaded)."""

    async def model_info(self, model: str, load: bool = True) -> dict:
        """Separate's word on `model`: "loaded" (cached from then on), "available" (weights
        there, not loaded; only with `load` false), "missing" with the reason, or "loading"
        while no Separate replica answers within `HEALTH_WAIT_S`."""
        if model in self._infos:
            return self._infos[model]
        call = (self._for_model[model].info.remote(model) if load else
                self._separate.describe.remote(model))
        try:
            info = await asyncio.wait_for(call, HEALTH_WAIT_S)
        except asyncio.TimeoutError:
            return {"model": model, "state": "loading",
                    "detail": f"no answer from Separate within {HEALTH_WAIT_S:g} s: its "
                              f"replica is starting, or loading a model"}
        if info["state"] == "loaded":
            self._infos[model] = info
        return info

    async def model_states(self) -> tp.Dict[str, dict]:
        """Every served model's state: the default one loaded, the others described."""
        names = self._settings.served_models
        infos = await asyncio.gather(*(self.model_info(name, load=name == self._default)
                                       for name in names))
        return dict(zip(names, infos))

    async def ready_model(self, model: str) -> dict:
        """`model`'s facts once it is loaded (it is loaded now if it is not); the default
        model answers 503 while its replica starts, any model 404 without its weights."""
        if model == self._default:
            info = await self.model_info(model)
        elif model in self._infos:
            info = self._infos[model]
        else:  # its weights looked for first: a missing model is answered at once
            info = await self._separate.describe.remote(model)
            if info["state"] != "missing":
                info = await self._for_model[model].info.remote(model)
            if info["state"] == "loaded":
                self._infos[model] = info
        if info["state"] == "missing":
            if model == self._default:
                raise ModelUnavailableError(f"model {model!r} is missing: {info['detail']}")
            raise ModelMissingError(f"model {model!r} is not available: {info['detail']}")
        if info["state"] != "loaded":
            raise ModelUnavailableError(f"model {model!r} is {info['state']}: "
                                        f"{info['detail']}")
        return info

    def health_view(self, info: dict, models: tp.Dict[str, dict]) -> dict:
        return {"status": {"loaded": "ok", "loading": "loading"}.get(info["state"],
                                                                     "unavailable"),
                **info,
                "models": {name: {key: model[key] for key in ("state", "detail") if key in model}
                           for name, model in models.items()},
                "max_upload_mb": self._settings.max_upload_mb,
                "max_audio_seconds": self._settings.max_audio_seconds}


@router.get("/", summary="Health: status, the default model and whether each model served "
            "is loaded, available (loads on first use) or missing")
async def health(ingress: ModelStates = Depends(this_replica)) -> dict:
    models = await ingress.model_states()
    return ingress.health_view(models[ingress._default], models)


@router.get("/healthz", summary="Liveness: 200 while the HTTP front answers")
async def liveness() -> dict:
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: 200 once the default model is loaded, else 503",
            responses={503: {"description": "the model is loading or missing"}})
async def readiness(ingress: ModelStates = Depends(this_replica)):
    info = await ingress.model_info(ingress._default)
    health = ingress.health_view(info, {ingress._default: info})
    if health["status"] == "ok":
        return {"status": "ready", "models": health["models"]}
    return error(503, "not_ready", f"model {ingress._default!r} is {info['state']}",
                 models=health["models"])


@router.get("/models", summary="The models served: for each, its state (loaded, available, "
            "missing with the file that is missing, loading), its stems and whether it is the "
            "default")
async def models(ingress: ModelStates = Depends(this_replica)) -> dict:
    states = await ingress.model_states()
    return {"default": ingress._default,
            "models": [{"name": name, "default": name == ingress._default, **{
                key: value for key, value in info.items() if key != "model"}}
                for name, info in states.items()]}


@router.get("/metrics", summary="Prometheus metrics: Ray Serve's, Ray's (GPU utilisation where "
            "present) and the service's (serve_graph_*), from this node's Ray metrics agent",
            response_class=PlainTextResponse)
async def prometheus_metrics() -> PlainTextResponse:
    text = await asyncio.to_thread(metrics.node_metrics_text)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@router.get("/stats", summary="Batching counters and model seconds of the Separate deployment "
            "(one replica), and the object store's use")
async def stats(ingress: ModelStates = Depends(this_replica)) -> dict:
    counters = await ingress._separate.stats.remote()
    counters["object_store"] = await asyncio.to_thread(object_store_usage)
    return counters
