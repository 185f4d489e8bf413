"""What travels between the deployments of one request."""
import asyncio
import ctypes
import logging
import time
import typing as tp

from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from .engine.plan import Song

__all__ = ["MixRef", "MixLostError", "ModelHandles", "Song", "REPLICA_LOST", "SONG_LOST",
           "awaited", "release_memory", "retrying"]
logger = logging.getLogger("ray.serve")
T = tp.TypeVar("T")


def release_memory() -> None:
    """Hand the memory freed by a finished song back to the system: glibc keeps freed blocks
    in per-thread arenas, so without this a replica's RSS only ever grows with its peak
    concurrency (3.2 GB in Encode after 200 songs from 50 clients)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class MixRef:
    """An object ref to a song's mix `[C, T]` float32 with its normalisation (`mean`, `std`:
    each window's input is normalised by them), boxed so that Ray passes the ref itself (a
    top-level ref argument would be fetched by whoever receives it). In the service,
    `Song.mix` holds one.

    Each call's receiver gets its own copy of the box: `release()` drops that copy's ref once
    the mix is read. Serve's batch loop keeps its last batch's arguments until the next batch
    comes (`_process_batches` in ray/serve/batching.py), which otherwise pinned the last
    songs' mixes in the object store after traffic stopped. The sender's box is released too
    once the song is done (Encode): a handle's router keeps the arguments of calls it has
    routed (seen with the per-model handles of model multiplexing), and those hold the
    sender's box itself, not a copy."""
    __slots__ = ("ref", "mean", "std")

    def __init__(self, ref: tp.Any, mean: float, std: float):
        self.ref, self.mean, self.std = ref, mean, std

    def __getstate__(self):
        return self.ref, self.mean, self.std

    def __setstate__(self, state) -> None:
        self.ref, self.mean, self.std = state

    def release(self) -> None:
        self.ref = None


class ModelHandles:
    """Separate's handle per model, made once: Serve routes each one's calls to replicas that
    have that model loaded (model multiplexing)."""

    def __init__(self, separate: tp.Any):
        self._separate = separate
        self._handles: tp.Dict[str, tp.Any] = {}

    def __getitem__(self, model: str) -> tp.Any:
        if model not in self._handles:
            self._handles[model] = self._separate.options(multiplexed_model_id=model)
        return self._handles[model]


class MixLostError(RuntimeError):
    """A song's mix left the object store (the Decode replica that owned it died): decode the
    song again."""


# A call that failed with one of these went to a replica that died or was going away: the same
# call succeeds on a live or restarted replica.
REPLICA_LOST = (ray_errors.RayActorError, ray_errors.WorkerCrashedError,
                serve_errors.ReplicaUnavailableError)
# ...and these end a whole song's attempt, which starts again from its upload.
SONG_LOST = REPLICA_LOST + (ray_errors.ObjectLostError, MixLostError)


async def retrying(attempt: tp.Callable[[], tp.Awaitable[T]], errors: tp.Tuple[type, ...],
                   seconds: float, what: str, delay: float = 0.25, max_delay: float = 4.) -> T:
    """`await attempt()`, again after `delay` (doubling up to `max_delay`) while it raises one
    of `errors`, until the next try would start more than `seconds` from now."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await attempt()
        except errors as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: %s; retrying in %.2f s", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay)


async def awaited(response: tp.Any) -> tp.Any:
    """The result of a `DeploymentResponse`; when the awaiting task is cancelled, the call is
    cancelled too. Serve does that by itself only for calls made while handling a request that
    is cancelled, not for calls of a background task (a job)."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
