"""The Separate deployment: the model on its device, windows batched across requests."""
import asyncio
import logging
import os
import threading
import time
import typing as tp
import warnings
from collections import Counter

import numpy as np
import ray
import torch as th
from ray import serve

from .engine import ModelNotFoundError, ModelRunner, ModelUnavailableError, load_model
from .engine.separator import run_windows
from .engine.windows import Window
from .launch import keep_replica_server_on_loopback
from .messages import MixRef
from .settings import ServiceSettings

logger = logging.getLogger("ray.serve")
# Mixes are read zero-copy from the object store (read-only) and never written: windows are
# copied out of them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@serve.deployment(max_ongoing_requests=256)
class Separate:
    """Holds the model once per replica. `separate_window` takes one window and is called
    concurrently for every window of every song in flight; `@serve.batch` stacks the windows
    waiting at that moment (of one song or of several) into one forward pass."""

    def __init__(self, settings: ServiceSettings):
        keep_replica_server_on_loopback()
        if settings.threads:
            th.set_num_threads(settings.threads)
        elif os.cpu_count():
            th.set_num_threads(os.cpu_count())  # Ray sets OMP threads to num_cpus otherwise
        self.model_name = settings.model
        self._settings = settings
        self.runner: tp.Optional[ModelRunner] = None
        self.problem: tp.Optional[str] = None
        self._load()
        self._lock = threading.Lock()
        self._stats: tp.Dict[str, tp.Any] = {"batches": 0, "windows": 0, "model_seconds": 0.,
                                             "multi_request_batches": 0,
                                             "max_requests_in_batch": 0,
                                             "batch_sizes": Counter()}

    def _load(self) -> None:
        """Load the model; without its weights the replica stays up and reports them missing
        (`info`), so a cluster deployment says what is wrong instead of restarting forever."""
        try:
            model = load_model(self._settings.model, self._settings.model_repo)
        except ModelNotFoundError as exc:
            self.problem = str(exc)
            logger.error("model %r missing: %s", self._settings.model, exc)
            return
        # start-up work (memory measurement, torch.compile, CUDA graph capture) happens here
        self.runner = ModelRunner(model, options=self._settings.runner_options())
        self.problem = None

    def _loaded(self) -> ModelRunner:
        if self.runner is None:
            raise ModelUnavailableError(f"model {self.model_name!r} is not loaded: "
                                        f"{self.problem}")
        return self.runner

    def reconfigure(self, config: dict) -> None:
        """`user_config` from serve_config.yaml: batching knobs, changeable without restart."""
        self.separate_window.set_max_batch_size(int(config.get("max_batch_size", 1)))
        self.separate_window.set_batch_wait_timeout_s(
            float(config.get("batch_wait_timeout_s", 0.0)))

    def info(self) -> dict:
        """The model's state: "loaded" with its facts, or "missing" with the reason (the load
        is retried here, so weights put in place later are picked up)."""
        if self.runner is None:
            self._load()
        if self.runner is None:
            return {"model": self.model_name, "state": "missing", "detail": self.problem}
        geometry = self.runner.geometry
        return {"model": self.model_name, "state": "loaded", "device": str(self.runner.device),
                "precision": self.runner.precision, "compile": self.runner.options.compile,
                "batch_limit": self.runner.batch_limit(),
                "startup_seconds": round(self.runner.startup_seconds, 2),
                "sample_rate": geometry.samplerate,
                "sources": list(geometry.sources),
                "max_batch_size": self.separate_window._get_max_batch_size(),
                "batch_wait_timeout_s": self.separate_window._get_batch_wait_timeout_s()}

    def geometry(self):
        return self._loaded().geometry

    def stats(self) -> dict:
        with self._lock:
            stats = dict(self._stats, batch_sizes=dict(self._stats["batch_sizes"]))
        stats["mean_batch_size"] = stats["windows"] / stats["batches"] if stats["batches"] else 0.
        return stats

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def separate_window(self, mixes: tp.List[MixRef], windows: tp.List[Window],
                              request_ids: tp.List[str]) -> tp.List[np.ndarray]:
        """Batched: one `(mix, window, request_id)` per caller, where `mix` is an object ref to
        a song's normalised mix `[C, T]`. Returns each window's trimmed stems
        `[S, C, window.length]` float32, or None when its mix is lost."""
        return await asyncio.to_thread(self._run, mixes, windows, request_ids)

    def _run(self, mixes, windows, request_ids) -> tp.List[tp.Optional[np.ndarray]]:
        runner = self._loaded()
        arrays = _fetch(mixes)
        outputs: tp.List[tp.Optional[np.ndarray]] = [None] * len(windows)
        groups: tp.Dict[tp.Tuple[int, int], tp.List[int]] = {}
        for index, window in enumerate(windows):
            if arrays[index] is not None:  # a lost mix: its caller gets None
                groups.setdefault((window.model_index, window.input_length), []).append(index)
        for indices in groups.values():
            start = time.perf_counter()
            stems = run_windows(runner, [th.from_numpy(arrays[i]) for i in indices],
                                [windows[i] for i in indices])
            for i, out in zip(indices, stems):
                outputs[i] = out.contiguous().numpy()
            self._count(len(indices), len(set(request_ids[i] for i in indices)),
                        time.perf_counter() - start)
        return outputs

    def _count(self, size: int, requests: int, seconds: float) -> None:
        with self._lock:
            self._stats["model_seconds"] += seconds
            self._stats["batches"] += 1
            self._stats["windows"] += size
            self._stats["batch_sizes"][size] += 1
            self._stats["multi_request_batches"] += requests > 1
            self._stats["max_requests_in_batch"] = max(self._stats["max_requests_in_batch"],
                                                       requests)


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
