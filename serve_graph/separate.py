"""The Separate deployment: the model on its device, windows batched across requests.

torch and the model code are imported where the replica first runs them, not with this
module: Serve's build task imports every deployment module to build the graph, runs no model,
and is on the path of every cold start."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import typing as tp
import weakref
from collections import Counter

import ray
from ray import serve

from . import engine, metrics
from .engine import cpu_settings
from .engine.errors import ModelMissingError, ModelNotFoundError
from .engine.model_files import weights_problem
from .launch import SHUTDOWN_POLL_S, keep_replica_server_on_loopback, log_replica_ready
from .messages import MixRef
from .settings import ServiceSettings

if tp.TYPE_CHECKING:
    import numpy as np

    from .engine import ModelRunner
    from .engine.plan import Window

logger = logging.getLogger("ray.serve")


# Models one Separate replica keeps loaded; Serve unloads the least recently used beyond.
# Read when this module is imported (set it in the replicas' runtime_env to change it).
MODELS_PER_REPLICA = int(os.environ.get("SERVE_GRAPH_MODELS_PER_REPLICA", "3"))


@serve.deployment(max_ongoing_requests=256,
                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class Separate:
    """Holds the served models, each loaded once per replica on first use (Ray Serve model
    multiplexing: requests for a model go to the replicas that have it loaded). The default
    model is loaded at start. `separate_window` takes one window and is called concurrently
    for every window of every song in flight; `@serve.batch` stacks the windows waiting at
    that moment (of one song or of several) into one forward pass per model."""

    UNCLAIMED_S = 60.  # how long a model loaded for callers that all went away waits for one

    def __init__(self, settings: ServiceSettings):
        keep_replica_server_on_loopback()
        # chosen on this replica's machine; what must precede torch's import is set now
        cpu, self._cpu = cpu_settings.prepare(settings.precision)
        logger.info(cpu_settings.summary(self._cpu))
        import torch as th
        # Ray sets OMP threads to the replica's num_cpus otherwise
        th.set_num_threads(settings.threads or cpu.threads or os.cpu_count() or 1)
        self._settings = settings
        self._loaded: "weakref.WeakValueDictionary[str, ModelRunner]" = (
            weakref.WeakValueDictionary())  # what the multiplexer holds, by name
        self._started: tp.Dict[str, ModelRunner] = {}  # loaded, not yet multiplexed
        self._builds: tp.Dict[str, asyncio.Future] = {}  # loads under way, by name
        self._sources: tp.Dict[str, dict] = {}  # of models described, by name
        # start-up work (memory measurement, torch.compile, CUDA graph capture) happens here
        try:
            self._started[settings.model] = self._build(settings.model)
        except ModelMissingError as exc:
            logger.error("model %r missing: %s", settings.model, exc.detail)
        self._lock = threading.Lock()
        self._stats: tp.Dict[str, tp.Any] = {"batches": 0, "windows": 0, "model_seconds": 0.,
                                             "fp32_redone_windows": 0,
                                             "multi_request_batches": 0,
                                             "max_requests_in_batch": 0,
                                             "batch_sizes": Counter()}
        self._run_windows = engine.run_windows  # imported at start, not by the first batch
        log_replica_ready(logger)

    def _build(self, name: str, download: bool = True) -> ModelRunner:
        """Model `name` on this replica's device; `ModelMissingError` naming the missing
        file when its weights are not in place. Only the replica's start may `download` them
        (Demucs' loader): on a request's path a missing file is answered at once, since a
        download on a machine without the internet can hang for minutes."""
        problem = None if download else weights_problem(name, self._settings.model_repo)
        if problem is not None:
            raise ModelMissingError(problem)
        try:
            model = engine.load_model(name, self._settings.model_repo)
        except ModelNotFoundError as exc:
            raise ModelMissingError(str(exc)) from None
        runner = engine.ModelRunner(model, options=self._settings.runner_options())
        problem = (cpu_settings.precision_problem(runner.precision)
                   if runner.device.type == "cpu" else None)
        if problem:
            raise ValueError(problem)
        self._loaded[name] = runner
        return runner

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def runner(self, name: str) -> ModelRunner:
        """The loaded model `name` (loaded now when it is not: Serve keeps the last
        `MODELS_PER_REPLICA` used).

        A load runs in a thread that cannot be stopped, so it is one task per name, shielded
        from its caller: when the caller is cancelled (its client went away), Serve lets the
        next caller in, and that caller waits for the same load rather than starting a second
        one beside it (twice the time, two copies of the weights)."""
        if name not in self._started and name not in self._builds:
            self._builds[name] = asyncio.ensure_future(self._build_in_thread(name))
        if name in self._builds:
            await asyncio.shield(self._builds[name])
        return self._started.pop(name)

    async def _build_in_thread(self, name: str) -> None:
        """Loads model `name` into `_started`; its error, if any, goes to whoever waits. A
        model no caller takes in `UNCLAIMED_S` (all went away) is let go (`_let_go`)."""
        try:
            runner = await asyncio.to_thread(self._build, name, False)
            self._started[name] = runner
            asyncio.get_running_loop().call_later(self.UNCLAIMED_S, self._let_go, name,
                                                  weakref.ref(runner))
        finally:
            del self._builds[name]

    def _let_go(self, name: str, loaded: "weakref.ref[ModelRunner]") -> None:
        """Drops model `name` if the load `loaded` is still untaken: held here, outside the
        multiplexer's count, it would stay beyond `MODELS_PER_REPLICA` for good."""
        runner = loaded()
        if runner is not None and self._started.get(name) is runner:
            del self._started[name]
            logger.info("model %r, loaded for a request that went away, let go", name)

    def reconfigure(self, config: dict) -> None:
        """`user_config` from serve_config.yaml: batching knobs, changeable without restart."""
        self.separate_window.set_max_batch_size(int(config.get("max_batch_size", 1)))
        self.separate_window.set_batch_wait_timeout_s(
            float(config.get("batch_wait_timeout_s", 0.0)))

    async def info(self, name: str) -> dict:
        """Model `name`'s state: "loaded" with its facts (it is loaded now when its weights are
        there), or "missing" with the reason (looked for again on each call, so weights put in
        place later are picked up)."""
        try:
            runner = await self.runner(name)
        except ModelMissingError as exc:
            return _missing(name, exc.detail)
        return self._facts(name, runner)

    async def describe(self, name: str) -> dict:
        """Model `name`'s state without keeping it loaded: "loaded" (here), "available" (its
        weight files are in place; with its sources) or "missing" (naming the file). Looks at
        files, never downloads; an available model is loaded once to read its sources."""
        runner = self._loaded.get(name)
        if runner is not None:
            return self._facts(name, runner)
        problem = await asyncio.to_thread(weights_problem, name, self._settings.model_repo)
        if problem is not None:
            return _missing(name, problem)
        if name not in self._sources:
            self._sources[name] = await asyncio.to_thread(self._read_sources, name)
        return {"model": name, "state": "available", **self._sources[name]}

    def _read_sources(self, name: str) -> dict:
        geometry = engine.model_geometry(engine.load_model(name, self._settings.model_repo))
        return {"sources": list(geometry.sources), "models_in_bag": geometry.num_models,
                "family": geometry.family}

    def _facts(self, name: str, runner: ModelRunner) -> dict:
        geometry = runner.geometry
        return {"model": name, "state": "loaded", "device": str(runner.device),
                "precision": runner.precision, "compile": runner.options.compile,
                "batch_limit": runner.batch_limit(),
                "startup_seconds": round(runner.startup_seconds, 2),
                "sample_rate": geometry.samplerate, "sources": list(geometry.sources),
                "models_in_bag": geometry.num_models, "family": geometry.family,
                "max_batch_size": self.separate_window._get_max_batch_size(),
                "batch_wait_timeout_s": self.separate_window._get_batch_wait_timeout_s(),
                **({"cpu_settings": self._cpu} if runner.device.type == "cpu" else {})}

    async def geometry(self, name: str):
        return (await self.runner(name)).geometry

    def stats(self) -> dict:
        with self._lock:
            stats = dict(self._stats, batch_sizes=dict(self._stats["batch_sizes"]))
        stats["mean_batch_size"] = stats["windows"] / stats["batches"] if stats["batches"] else 0.
        stats["models_loaded"] = sorted(self._loaded)
        return stats

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def separate_window(self, mixes: tp.List[MixRef], windows: tp.List[Window],
                              request_ids: tp.List[str], models: tp.List[str]
                              ) -> tp.List[np.ndarray]:
        """Batched: one `(mix, window, request_id, model)` per caller, where `mix` is an object
        ref to a song's mix `[C, T]` and its normalisation. Returns each window's trimmed stems
        `[S, C, window.length]` float32, or None when its mix is lost."""
        runners = {name: await self.runner(name) for name in dict.fromkeys(models)}
        return await asyncio.to_thread(self._run, mixes, windows, request_ids, models, runners)

    def _run(self, mixes, windows, request_ids, models,
             runners: tp.Dict[str, ModelRunner]) -> tp.List[tp.Optional[np.ndarray]]:
        arrays = _fetch(mixes)
        outputs: tp.List[tp.Optional[np.ndarray]] = [None] * len(windows)
        groups: tp.Dict[tp.Tuple[str, int, int], tp.List[int]] = {}
        for index, window in enumerate(windows):
            if arrays[index] is not None:  # a lost mix: its caller gets None
                key = (models[index], window.model_index, window.input_length)
                groups.setdefault(key, []).append(index)
        for (model, _, _), indices in groups.items():
            start = time.perf_counter()
            stems = self._run_windows(runners[model], [arrays[i] for i in indices],
                                      [windows[i] for i in indices],
                                      norms=[(mixes[i].mean, mixes[i].std) for i in indices])
            for i, out in zip(indices, stems):
                outputs[i] = out.contiguous().numpy()
            self._count(model, len(indices), len(set(request_ids[i] for i in indices)),
                        time.perf_counter() - start, runners[model].take_fp32_redone())
        return outputs

    def _count(self, model: str, size: int, requests: int, seconds: float,
               fp32_redone: int) -> None:
        metrics.batch_run(model, size, seconds, fp32_redone)
        with self._lock:
            self._stats["model_seconds"] += seconds
            self._stats["fp32_redone_windows"] += fp32_redone
            self._stats["batches"] += 1
            self._stats["windows"] += size
            self._stats["batch_sizes"][size] += 1
            self._stats["multi_request_batches"] += requests > 1
            self._stats["max_requests_in_batch"] = max(self._stats["max_requests_in_batch"],
                                                       requests)


def _missing(name: str, detail: str) -> dict:
    return {"model": name, "state": "missing", "detail": detail}


def _fetch(mixes: tp.List[MixRef]) -> tp.List[tp.Optional[np.ndarray]]:
    """Each caller's mix `[C, T]` (zero-copy from the object store), None where it is lost.
    The boxes' refs are released: the arrays keep what this batch needs, and nothing here
    keeps a mix alive after it."""
    unique = {mix.ref: None for mix in mixes}
    for ref in unique:
        try:
            unique[ref] = ray.get(ref)
        except ray.exceptions.ObjectLostError:
            logger.warning("a mix was lost from the object store (its owner died)")
    arrays = [unique[mix.ref] for mix in mixes]
    for mix in mixes:
        mix.release()
    return arrays
