"""The Encode deployment: window outputs -> overlap-add -> stems -> MP3/WAV -> ZIP."""
import asyncio

import numpy as np
import torch as th
from ray import serve

from .engine import OverlapAdd, SeparationOptions, stem_files, zip_files
from .engine.windows import denormalise
from .messages import DecodedSong


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class Encode:
    """Overlap-adds a song's separated windows with Demucs' transition weights, averages shifts,
    undoes the normalisation, mixes `two_stems` and encodes the stems in parallel into a ZIP."""

    async def encode(self, song: DecodedSong, options: SeparationOptions,
                     *outputs: np.ndarray) -> bytes:
        """`outputs[i]` is window `song.plan.windows[i]`'s stems `[S, C, length]`."""
        return await asyncio.to_thread(self._encode, song, options, outputs)

    def _encode(self, song: DecodedSong, options: SeparationOptions, outputs) -> bytes:
        acc = OverlapAdd(song.plan, song.geometry)
        for window, out in zip(song.plan.windows, outputs):
            acc.add(window, th.from_numpy(np.array(out)))  # object-store arrays are read-only
        stems = denormalise(acc.result(), song.mean, song.std)
        geometry = song.geometry
        return zip_files(stem_files(dict(zip(geometry.sources, stems)), geometry.samplerate,
                                    options))
