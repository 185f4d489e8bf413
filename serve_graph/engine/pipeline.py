"""The separation recipe, once, for the CLI and the service alike:

1. `prepare`: bytes -> decoded mix, its normalisation + window plan (Decode);
2. `run_windows` (separator.py): batches of windows through the model (Separate);
3. `SongWriter`: window outputs -> overlap-add -> stems encoded as they become final -> ZIP
   (Encode); a remix or a STEMS file is one file, no ZIP.

`separate_to_zip` runs the three in one process. Steps 1 and 3 are NumPy (no torch): the Decode
and Encode replicas import this module and never torch."""
import math
import os
import tempfile
import time
import typing as tp
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from . import ni_stems
from .audio import decode, output_names, select_stems, zip_files
from .errors import OverBudgetError
from .options import SeparationOptions
from .output import MAX_PENDING_CHUNKS, EncodeClock, StemFile, planar, spill_dir
from .overlap_add import NORMALISED, OverlapAdd, denormalise, normalisation
from .plan import ModelGeometry, Plan, Song, Window, plan_windows
from .split_decode import SplitDecoder

if tp.TYPE_CHECKING:
    from .separator import ModelRunner

def check_budget(plan: Plan, max_windows: tp.Optional[int], geometry: ModelGeometry) -> None:
    """Raise `OverBudgetError`, stating the limit, when `plan` costs more than `max_windows`
    model windows of htdemucs (duration x passes / stride; a RoFormer window counts as its
    `window_cost` of them; None: no limit)."""
    cost = len(plan.windows) * geometry.window_cost
    if max_windows is None or cost <= max_windows:
        return
    seconds = plan.length / geometry.samplerate
    counted = (f"{len(plan.windows)} model windows" if geometry.window_cost == 1 else
               f"{len(plan.windows)} windows of a model that costs {geometry.window_cost:.1f} "
               f"htdemucs windows each, {cost:.0f} in all")
    raise OverBudgetError(
        f"this request needs {counted} ({seconds:.1f} s of audio, "
        f"{len(plan.passes)} pass(es) of shifts and models, at this overlap); one request may "
        f"take at most {max_windows}: use fewer shifts, less overlap or a shorter song")


def prepare(data: bytes, geometry: ModelGeometry, options: SeparationOptions,
            max_seconds: tp.Optional[float] = None, max_windows: tp.Optional[int] = None,
            split: tp.Optional[SplitDecoder] = None) -> Song:
    """Step 1 of the recipe: audio file bytes -> decoded mix, its normalisation and window
    plan (within the duration limit and the window budget; `plan_song`). `split` decodes an
    MP3 in parts at once."""
    wav = decode(data, geometry.samplerate, geometry.audio_channels, max_seconds, split)
    return plan_song(wav, geometry, options, max_windows)


def plan_song(wav: np.ndarray, geometry: ModelGeometry, options: SeparationOptions,
              max_windows: tp.Optional[int] = None) -> Song:
    """A decoded mix `[C, T]` (model rate) -> its normalisation and window plan, within the
    window budget. The mix is normalised window by window, where each is cut
    (`window_input`): one pass over the song less here. A stem subset plans only the bag's
    sub-models that weigh on those stems (`ModelGeometry.models_for`)."""
    mean, std = normalisation(wav) if geometry.normalises else NORMALISED
    plan = plan_windows(wav.shape[-1], geometry, options.shifts, options.overlap, options.seed,
                        models=geometry.models_for(options.stem_list))
    check_budget(plan, max_windows, geometry)
    return Song(wav, plan, mean, std, geometry, options.model)


class SongWriter:
    """Step 3 of the recipe: window outputs in (any order, best `in_order`), stem files
    encoded as their stretches become final, a ZIP out.

    `add` takes one window's trimmed stems `[S, C, length]`; `finish` returns the ZIP (a
    remix or STEMS file: that one file, `SeparationOptions.result_media_type`); `close`
    (always, also on failure) frees the spill files. MP3 chunks encode on `pool`, which has
    `threads` threads: each stem queues enough chunks to keep them all busy.
    """

    TAKE_SAMPLES = 1 << 16  # hand final audio to the encoders in stretches of at least this

    def __init__(self, song: Song, options: SeparationOptions, pool: Executor,
                 threads: int = 1):
        self.song, self.options = song, options
        self._acc = OverlapAdd(song.plan, song.geometry)
        self.clock = EncodeClock()
        self.overlap_add_seconds = self.zip_seconds = 0.
        self._spill = tempfile.TemporaryDirectory(prefix="stems-", dir=spill_dir())
        self._stems_file = options.output_format == "stems"  # NI STEMS: AAC tracks, muxed
        self._remix = options.remix_gains  # parsed once, not per stretch
        names = output_names(song.geometry.sources, options.two_stems, options.stem_list,
                             self._remix, self._stems_file)
        fmt = "m4a" if self._stems_file else options.output_format
        pending = max(MAX_PENDING_CHUNKS, math.ceil(threads / len(names)) + 1)
        self.files = {f"{name}.{fmt}": StemFile(
            fmt, song.plan.length, song.geometry.audio_channels, song.geometry.samplerate,
            pool, self._spill.name, options.output_bitrate, options.wav_depth, self.clock,
            options.clip, pending, options.encoder_quality) for name in names}
        self.windows_added = 0

    def add(self, window: Window, output: tp.Any) -> None:
        """Window `window`'s trimmed stems `[S, C, window.length]` (a tensor, or a float32
        array used in place: one read from the object store), and every stretch of the stems
        that is final now written."""
        start = time.perf_counter()
        self._acc.add(window, output)
        self.windows_added += 1
        stems = self._final_stems()
        self.overlap_add_seconds += time.perf_counter() - start
        for file, audio in zip(self.files.values(), stems):
            file.write(planar(audio))

    def _final_stems(self) -> tp.List[np.ndarray]:
        """The output stems' next final stretch, `[C, n]` each (none until one is ready)."""
        stretch = self._acc.take(self.TAKE_SAMPLES)
        if stretch is None:
            return []
        stems = denormalise(stretch, self.song.mean, self.song.std)
        return list(select_stems(dict(zip(self.song.geometry.sources, stems)),
                                 self.options.two_stems, self.options.stem_list,
                                 self._remix, self._stems_file).values())

    def finish(self) -> bytes:
        """The answer: a ZIP of the stem files, or the one file of a remix or STEMS."""
        files = self.finish_files()
        if self.options.one_file:
            return next(iter(files.values()))
        start = time.perf_counter()
        archive = zip_files(files)
        self.zip_seconds = time.perf_counter() - start
        return archive

    def finish_files(self) -> tp.Dict[str, bytes]:
        """The finished files by name: the stems (`vocals.mp3`...), or the one file of a
        remix (`remix.<format>`) or STEMS (`song.stem.mp4`). Raises when windows are
        missing."""
        if not self._acc.done:
            raise RuntimeError(f"{self.windows_added} of {len(self.song.plan.windows)} windows "
                               f"were added")
        files = {name: file.finish() for name, file in self.files.items()}
        if self._stems_file:
            return {"song.stem.mp4": ni_stems.container(list(files.values()),
                                                        self.song.geometry.sources)}
        return files

    def timings(self) -> tp.Dict[str, float]:
        """Seconds by stage: overlap_add (wall, adding windows and taking stems), encode (wall
        from the first encoding task to the last), encode_cpu (CPU seconds of all of them),
        zip."""
        return {"overlap_add": self.overlap_add_seconds, "encode": self.clock.wall,
                "encode_cpu": self.clock.cpu, "zip": self.zip_seconds}

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self._spill.cleanup()


def separate_to_zip(data: bytes, runner: "ModelRunner", options: SeparationOptions,
                    batch_size: int = 1, max_seconds: tp.Optional[float] = None,
                    progress: bool = False,
                    timings: tp.Optional[tp.Dict[str, float]] = None,
                    threads: tp.Optional[int] = None) -> bytes:
    """Audio file bytes -> ZIP of stems (a remix or STEMS file: that file), in this process:
    the recipe's three steps in a loop, the stems encoding on `threads` threads (default: one
    per core) while the model runs. `timings` collects seconds per stage: decode, windows,
    model, overlap_add (with the encoding of WAV/FLAC), finish (waiting for the last MP3
    chunks, joining, ZIP), and the writer's `timings()` as writer_*."""
    from .separator import run_plan, timed  # the model's side: torch
    geometry = runner.geometry
    options.validate_for(geometry.sources)
    with timed(timings, "decode"):
        song = prepare(data, geometry, options, max_seconds)
    threads = threads or os.cpu_count() or 1
    pool = ThreadPoolExecutor(threads)
    writer = SongWriter(song, options, pool, threads)
    try:
        for batch, outputs in run_plan(runner, song.mix, song.plan, batch_size, progress,
                                       timings, (song.mean, song.std)):
            with timed(timings, "overlap_add"):
                for window, out in zip(batch, outputs):
                    writer.add(window, out)
        with timed(timings, "finish"):
            archive = writer.finish()
        if timings is not None:
            timings.update({f"writer_{k}": v for k, v in writer.timings().items()})
        return archive
    finally:
        writer.close()
        pool.shutdown(cancel_futures=True)
