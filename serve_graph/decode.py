"""The Decode deployment: upload bytes -> mix in the object store, its normalisation, window
plan. The decoder (PyAV, NumPy: no torch in this replica) is imported by the replica, not with
this module: the launcher imports every deployment module and is on the path of every cold
start."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import typing as tp

import ray
from ray import serve

from . import engine
from .engine.options import SeparationOptions
from .engine.plan import ModelGeometry
from .launch import SHUTDOWN_POLL_S, keep_replica_server_on_loopback, log_replica_ready
from .messages import MixRef, Song, release_memory
from .settings import ServiceSettings

logger = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25},
                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class Decode:
    """Decodes any audio FFmpeg reads to the model's rate and channels, measures how Demucs
    normalises it, plans its windows within the budget and puts the mix in the object store
    once."""

    def __init__(self, settings: ServiceSettings):
        self._settings = settings
        keep_replica_server_on_loopback()
        self._split = _split_decoder(settings.decode_helpers)
        self._prepare_song = engine.prepare  # imported at start, not by the first request
        log_replica_ready(logger)

    async def decode(self, data: bytes, geometry: ModelGeometry,
                     options: SeparationOptions) -> Song:
        try:
            return await asyncio.to_thread(self._prepare, data, geometry, options)
        finally:
            await asyncio.to_thread(release_memory)

    async def probe(self, data: bytes) -> tp.Optional[float]:
        """`engine.probe` under this service's duration limit: a job's upload checked from
        its headers before the job is queued."""
        return await asyncio.to_thread(engine.probe, data, self._settings.max_audio_seconds)

    def _prepare(self, data: bytes, geometry: ModelGeometry, options: SeparationOptions) -> Song:
        song = self._prepare_song(data, geometry, options, self._settings.max_audio_seconds,
                                  self._settings.max_windows, self._split)
        mix = MixRef(ray.put(song.mix), song.mean, song.std)
        if self._split is not None:  # copied into the object store: its memory is free
            self._split.recycle(song.mix)
        return dataclasses.replace(song, mix=mix)


def _split_decoder(helpers: int) -> tp.Optional[engine.SplitDecoder]:
    """`helpers` decode helpers, or none (one pass) when asked for none or when this machine
    cannot start them (no memfd, no processes in the sandbox)."""
    if helpers < 1:
        return None
    try:
        return engine.SplitDecoder(helpers)
    except OSError as exc:
        logger.warning("no decode helpers (%s): every song decodes in one pass", exc)
        return None
