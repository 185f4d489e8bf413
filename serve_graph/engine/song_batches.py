"""Several songs through the model at once: their windows batched *across* songs, so that every
forward pass but the last of a call is full (the batch mode's model actor; no Ray here).

A song's windows still come in its own front-to-back order (`in_order`), songs one after the
other, so the first song's stems are final first and memory holds few writers at a time. A
batch takes windows of one sub-model and input length only (a forward's inputs share a shape);
windows of another wait in their own batch until it is full or the songs run out.
"""
import typing as tp
from concurrent.futures import Executor

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


def separate_songs(runner: ModelRunner, songs: tp.Sequence[Song],
                   options: SeparationOptions, pool: Executor, threads: int,
                   batch_size: int, timings: tp.Optional[tp.Dict[str, float]] = None
                   ) -> tp.Iterator[tp.Tuple[int, tp.Dict[str, tp.Any]]]:
    """Separate `songs` with `options`, their windows batched across songs (`batches_across`,
    at most `batch_size` a forward): yields `(song index, files)` as each song's last window
    is in, `files` by name as `SongWriter.finish_files` gives them (bytes; MP3 chunks encode
    on `pool`'s `threads` threads while the model runs). `timings` collects the seconds of
    the "windows" and "model" stages."""
    writers: tp.Dict[int, SongWriter] = {}
    try:
        for batch in batches_across(songs, batch_size):
            outputs = run_windows(runner, [songs[i].mix for i, _ in batch],
                                  [window for _, window in batch], timings,
                                  [(songs[i].mean, songs[i].std) for i, _ in batch])
            for (index, window), output in zip(batch, outputs):
                writer = writers.get(index)
                if writer is None:
                    writer = writers[index] = SongWriter(songs[index], options, pool, threads)
                writer.add(window, output)
                if writer.windows_added == len(songs[index].plan.windows):
                    files = writer.finish_files()
                    writers.pop(index).close()
                    yield index, files
    finally:
        for writer in writers.values():
            writer.close()
