"""The Decode deployment: upload bytes -> normalised mix in the object store + window plan."""
import asyncio

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from .engine import decode, plan_windows
from .engine.pipeline import check_budget
from .engine.windows import normalise
from .messages import DecodedSong, MixRef
from .settings import ServiceSettings


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class Decode:
    """Decodes any audio FFmpeg reads to the model's rate and channels, normalises it as Demucs
    does, puts it in the object store once and plans its windows."""

    def __init__(self, separate: DeploymentHandle, settings: ServiceSettings):
        self._separate = separate
        self._settings = settings
        self._geometry = None

    async def decode(self, data: bytes, shifts: int, overlap: float, seed: int) -> DecodedSong:
        if self._geometry is None:
            self._geometry = await self._separate.geometry.remote()
        return await asyncio.to_thread(self._prepare, data, shifts, overlap, seed)

    def _prepare(self, data: bytes, shifts: int, overlap: float, seed: int) -> DecodedSong:
        geometry = self._geometry
        wav = decode(data, geometry.samplerate, geometry.audio_channels,
                     self._settings.max_audio_seconds)
        mix, mean, std = normalise(wav)
        plan = plan_windows(mix.shape[-1], geometry, shifts, overlap, seed)
        check_budget(plan, self._settings.max_windows, geometry.samplerate)
        return DecodedSong(MixRef(ray.put(mix.numpy())), plan, mean, std, geometry)
