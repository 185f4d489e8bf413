"""What travels between the deployments of one request."""
import typing as tp
from dataclasses import dataclass

from .engine import ModelGeometry, Plan


class MixRef(tp.NamedTuple):
    """An object ref to a song's normalised mix `[C, T]` float32, boxed so that Ray passes the
    ref itself (a top-level ref argument would be fetched by whoever receives it)."""
    ref: tp.Any


@dataclass(frozen=True)
class DecodedSong:
    """Decode's answer: the mix in the object store, the window plan and what undoes the
    normalisation. Small: the audio stays in the object store until Separate reads it."""
    mix: MixRef
    plan: Plan
    mean: float
    std: float
    geometry: ModelGeometry

    @property
    def seconds(self) -> float:
        return self.plan.length / self.geometry.samplerate
