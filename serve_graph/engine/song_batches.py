"""Several songs through the model at once: their windows batched *across* songs, so that every
forward pass but the last of a call is full (the batch mode's model actor; no Ray here).

A song's windows still come in its own front-to-back order (`in_order`), songs one after the
other, so the first song's stems are final first and memory holds few writers at a time. A
batch takes windows of one sub-model and input length only (a forward's inputs share a shape);
windows of another wait in their own batch until it is full or the songs run out. A batch's
outputs are overlap-added beside the model's next forward, each song's on a thread of its own.
"""
import collections
import typing as tp
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from .options import SeparationOptions
from .pipeline import SongWriter
from .plan import Song, Window, in_order
from .separator import ModelRunner, run_windows

SongWindow = tp.Tuple[int, Window]  # (the song's index in the call, one of its windows)


def batches_across(songs: tp.Sequence[Song], batch_size: int
                   ) -> tp.Iterator[tp.List[SongWindow]]:
    """Every window of every song, in batches of exactly `batch_size` windows that share a
    sub-model and input length, cut across song boundaries; the batches left at the end are
    smaller. Windows are taken song by song, each song's in `in_order`."""
    open_batches: tp.Dict[tp.Tuple[int, int], tp.List[SongWindow]] = {}
    for index, song in enumerate(songs):
        for window in in_order(song.plan):
            key = (window.model_index, window.input_length)
            batch = open_batches.setdefault(key, [])
            batch.append((index, window))
            if len(batch) == batch_size:
                yield open_batches.pop(key)
    yield from open_batches.values()


# batches' outputs that may wait for the adding threads while the model runs the next forward
ADDS_AHEAD = 1

Finished = tp.Tuple[int, tp.Dict[str, tp.Any]]  # (a song's index in the call, its files)


def separate_songs(runner: ModelRunner, songs: tp.Sequence[Song],
                   options: SeparationOptions, pool: Executor, threads: int,
                   batch_size: int, timings: tp.Optional[tp.Dict[str, float]] = None
                   ) -> tp.Iterator[Finished]:
    """Separate `songs` with `options`, their windows batched across songs (`batches_across`,
    at most `batch_size` a forward): yields `(song index, files)` as each song's last window
    is in, `files` by name as `SongWriter.finish_files` gives them (bytes; the stems encode
    on `pool`'s `threads` threads while the model runs). `timings` collects the seconds of
    the "windows" and "model" stages.

    The outputs are overlap-added on threads of their own, one per song (`SongWriters`),
    beside the next forward: the model does not wait for them, also when this call is the
    only one of its actor (the last of a batch run), and songs are added side by side (one
    waiting for its encoders does not hold up the next). At most `ADDS_AHEAD` batches'
    outputs wait for those threads (a batch's outputs: `batch_size x S x C x window` float32,
    176 MB at 16 htdemucs windows).
    """
    writers = SongWriters(songs, options, pool, threads)
    pending: tp.Deque[tp.List[Future]] = collections.deque()  # each batch's adds
    try:
        for batch in batches_across(songs, batch_size):
            try:
                outputs = run_windows(runner, [songs[i].mix for i, _ in batch],
                                      [window for _, window in batch], timings,
                                      [(songs[i].mean, songs[i].std) for i, _ in batch])
            except Exception:  # the songs that the adds before it finished are done
                while pending:
                    yield from finished(pending.popleft())
                raise
            pending.append(writers.add(batch, outputs))
            while pending and (len(pending) > ADDS_AHEAD or
                               all(add.done() for add in pending[0])):
                yield from finished(pending.popleft())
        while pending:
            yield from finished(pending.popleft())
    finally:  # failed or closed early: the adds not started are cancelled there
        writers.close()


def finished(adds: tp.List[Future]) -> tp.Iterator[Finished]:
    """The songs that a batch's adds (`SongWriters.add`) finished, once they are done (raising
    what an add raised)."""
    for add in adds:
        song = add.result()
        if song is not None:
            yield song


class SongWriters:
    """The `SongWriter` of each song of a call that has windows in and is not finished yet,
    and the thread (a lane) that adds its windows, in order."""

    def __init__(self, songs: tp.Sequence[Song], options: SeparationOptions, pool: Executor,
                 threads: int):
        self.songs, self.options, self.pool, self.threads = songs, options, pool, threads
        self.open: tp.Dict[int, SongWriter] = {}  # each touched by its song's lane alone
        self.lanes: tp.Dict[int, ThreadPoolExecutor] = {}

    def add(self, batch: tp.List[SongWindow], outputs: tp.Sequence[tp.Any]) -> tp.List[Future]:
        """Queue one batch's window outputs `[S, C, length]` on their songs' lanes: a future
        per song of the batch, giving `(index, files)` (`SongWriter.finish_files`) when these
        windows finished the song, else None."""
        by_song: tp.Dict[int, tp.List[tp.Tuple[Window, tp.Any]]] = {}
        for (index, window), output in zip(batch, outputs):
            by_song.setdefault(index, []).append((window, output))
        return [self._lane(index).submit(self._add, index, pairs)
                for index, pairs in by_song.items()]

    def _lane(self, index: int) -> ThreadPoolExecutor:
        lane = self.lanes.get(index)
        if lane is None:
            lane = self.lanes[index] = ThreadPoolExecutor(1, thread_name_prefix="overlap-add")
        return lane

    def _add(self, index: int, pairs: tp.List[tp.Tuple[Window, tp.Any]]
             ) -> tp.Optional[Finished]:
        writer = self.open.get(index)
        if writer is None:
            writer = self.open[index] = SongWriter(self.songs[index], self.options, self.pool,
                                                   self.threads)
        for window, output in pairs:
            writer.add(window, output)
        if writer.windows_added < len(self.songs[index].plan.windows):
            return None
        files = writer.finish_files()
        self.open.pop(index).close()
        self.lanes[index].shutdown(wait=False)  # its last task: the thread ends after it
        return index, files

    def close(self) -> None:
        """Wait for the lanes' running adds (those queued are dropped), then free the spill
        files of the songs not finished."""
        for lane in self.lanes.values():
            lane.shutdown(wait=True, cancel_futures=True)
        for writer in self.open.values():
            writer.close()
        self.open.clear()
