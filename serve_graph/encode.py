"""The Encode deployment: runs a song's windows through Separate and turns their outputs into
stem files as they arrive (overlap-add, MP3/WAV/FLAC, ZIP).

The engine's writers (overlap-add in NumPy, the encoders; no torch in this replica) are imported
by the replica, not with this module: the launcher imports every deployment module and is on
the path of every cold start."""
from __future__ import annotations

import asyncio
import logging
import math
import time
import typing as tp
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from . import engine, metrics
from .engine.options import SeparationOptions
from .engine.plan import Window, in_order
from .jobs import Progress
from .launch import SHUTDOWN_POLL_S, keep_replica_server_on_loopback, log_replica_ready
from .messages import (REPLICA_LOST, MixLostError, ModelHandles, Song, release_memory,
                       retrying)
from .settings import ServiceSettings

logger = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1},
                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class Encode:
    """Owns a song from its decoded mix to its ZIP. It calls Separate once per window, front to
    back, keeping at most `windows_in_flight` of the song's windows queued there (so that
    Separate's queue interleaves the songs in flight instead of serving them one after the
    other), adds each output to the song's `SongWriter` as it arrives, and retries a window
    whose Separate replica died. Nothing holds all of a song's windows; MP3 chunks encode on a
    pool of one thread per CPU given to this replica."""

    def __init__(self, separate: DeploymentHandle, settings: ServiceSettings):
        self._separate = ModelHandles(separate)
        self._waiting = 0  # windows sent to Separate and not back yet, all songs
        keep_replica_server_on_loopback()
        self._settings = settings
        self.threads = settings.encode_threads or _assigned_cpus()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="encode")
        self._writer = engine.SongWriter  # imported at start, not by the first request
        from .engine.output import sweep_spill
        swept = sweep_spill()
        if swept:
            logger.info("removed the spill folders of %d replicas that died", swept)
        log_replica_ready(logger)

    async def encode(self, song: Song, options: SeparationOptions,
                     job_id: tp.Optional[str] = None
                     ) -> tp.Tuple[np.ndarray, tp.Dict[str, float]]:
        """The ZIP of `song`'s stems as `options` ask (its bytes as a uint8 array: Ray copies
        an array once into the object store and the caller reads it there, where `bytes` cost
        two more copies, 0.044 -> 0.026 s for 20 MB), and seconds by stage: windows (first
        window sent to last output in), overlap_add, encode, encode_cpu, finish (last output
        in to ZIP ready), zip. Windows done are reported to job `job_id`, if any."""
        writer = self._writer(song, options, self._pool, self.threads)
        try:
            start = time.perf_counter()
            await self._run_windows(song, writer, Progress(job_id, len(song.plan.windows)))
            windows_done = time.perf_counter()
            archive = await asyncio.to_thread(writer.finish)
            timings = dict(writer.timings(), windows=windows_done - start,
                           finish=time.perf_counter() - windows_done)
            return np.frombuffer(archive, np.uint8), timings
        finally:
            writer.close()
            song.mix.release()  # the routers of the window calls keep their args (MixRef)
            await asyncio.to_thread(release_memory)

    def _waiting_changed(self, change: int) -> None:
        self._waiting += change
        metrics.windows_waiting(self._waiting)

    async def _run_windows(self, song: Song, writer: engine.SongWriter,
                           progress: Progress) -> None:
        request_id = uuid.uuid4().hex
        separate = self._separate[song.model]
        waiting = iter(in_order(song.plan))
        running: tp.Set[asyncio.Task] = set()
        try:
            while True:
                while len(running) < self._settings.windows_in_flight:
                    window = next(waiting, None)
                    if window is None:
                        break
                    running.add(asyncio.create_task(
                        self._window(separate, song, window, request_id)))
                    self._waiting_changed(+1)
                if not running:
                    return
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                self._waiting_changed(-len(done))
                for task in done:
                    window, output = task.result()
                    # read where it lies in the object store, not copied out first
                    await asyncio.to_thread(writer.add, window, output)
                    progress.windows_done(writer.windows_added)
        finally:
            for task in running:
                task.cancel()
            self._waiting_changed(-len(running))

    async def _window(self, separate: DeploymentHandle, song: Song, window: Window,
                      request_id: str) -> tp.Tuple[Window, np.ndarray]:
        """One window's stems `[S, C, length]`, retried on another replica while Separate
        replicas die, for up to `retry_seconds`."""
        output = await retrying(
            lambda: separate.separate_window.remote(song.mix, window, request_id,
                                                    song.model),
            REPLICA_LOST, self._settings.retry_seconds,
            f"window {window.index}: Separate replica lost")
        if output is None:
            raise MixLostError("the song's mix is no longer in the object store")
        return window, output


def _assigned_cpus() -> int:
    """The CPUs Ray gave this replica (`num_cpus` in serve_config.yaml), at least one."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.)
    return max(1, math.ceil(cpus - 1e-6))
