"""Several songs through the model at once: their windows batched *across* songs, so that every
forward pass but the last of a call is full (the batch mode's model actor; no Ray here).

A song's windows still come in its own front-to-back order (`in_order`), songs one after the
other, so the first song's stems are final first and memory holds few writers at a time. A
batch takes windows of one sub-model and input length only (a forward's inputs share a shape);
windows of another wait in their own batch until it is full or the songs run out. A batch's
outputs are overlap-added on a thread beside the model's next forward.
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


# batches' outputs that may wait for the adding thread while the model runs the next forward
ADDS_AHEAD = 1


def separate_songs(runner: ModelRunner, songs: tp.Sequence[Song],
                   options: SeparationOptions, pool: Executor, threads: int,
                   batch_size: int, timings: tp.Optional[tp.Dict[str, float]] = None
                   ) -> tp.Iterator[tp.Tuple[int, tp.Dict[str, tp.Any]]]:
    """Separate `songs` with `options`, their windows batched across songs (`batches_across`,
    at most `batch_size` a forward): yields `(song index, files)` as each song's last window
    is in, `files` by name as `SongWriter.finish_files` gives them (bytes; the stems encode
    on `pool`'s `threads` threads while the model runs). `timings` collects the seconds of
    the "windows" and "model" stages.

    The outputs are overlap-added on a thread of their own (`SongWriters`), beside the next
    forward: the model never waits for them, also when this call is the only one of its actor
    (the last of a batch run). At most `ADDS_AHEAD` batches' outputs wait for that thread
    (a batch's outputs: `batch_size x S x C x window` float32, 176 MB at 16 htdemucs windows).
    """
    writers = SongWriters(songs, options, pool, threads)
    pending: tp.Deque[Future] = collections.deque()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="overlap-add") as adder:
            try:
                for batch in batches_across(songs, batch_size):
                    try:
                        outputs = run_windows(runner, [songs[i].mix for i, _ in batch],
                                              [window for _, window in batch], timings,
                                              [(songs[i].mean, songs[i].std) for i, _ in batch])
                    except Exception:  # the songs that the adds before it finished are done
                        while pending:
                            yield from pending.popleft().result()
                        raise
                    pending.append(adder.submit(writers.add, batch, outputs))
                    while pending and (len(pending) > ADDS_AHEAD or pending[0].done()):
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:  # failed or closed early: what has not started never will
                for future in pending:
                    future.cancel()
    finally:  # after the adding thread's last task ended
        writers.close()


class SongWriters:
    """The `SongWriter` of each song of a call that has windows in and is not finished yet."""

    def __init__(self, songs: tp.Sequence[Song], options: SeparationOptions, pool: Executor,
                 threads: int):
        self.songs, self.options, self.pool, self.threads = songs, options, pool, threads
        self.open: tp.Dict[int, SongWriter] = {}

    def add(self, batch: tp.List[SongWindow], outputs: tp.Sequence[tp.Any]
            ) -> tp.List[tp.Tuple[int, tp.Dict[str, tp.Any]]]:
        """One batch's window outputs `[S, C, length]` added: the songs it finished, with
        their files (`SongWriter.finish_files`)."""
        finished = []
        for (index, window), output in zip(batch, outputs):
            writer = self.open.get(index)
            if writer is None:
                writer = self.open[index] = SongWriter(self.songs[index], self.options,
                                                       self.pool, self.threads)
            writer.add(window, output)
            if writer.windows_added == len(self.songs[index].plan.windows):
                files = writer.finish_files()
                self.open.pop(index).close()
                finished.append((index, files))
        return finished

    def close(self) -> None:
        for writer in self.open.values():
            writer.close()
        self.open.clear()
