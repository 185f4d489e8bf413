"""Stem files written while the song is still being separated.

A `StemFile` receives one stem's final audio stretch by stretch, in order, as float32
planar `[C, n]` arrays, and encodes as it goes: MP3 in chunks of `mp3.CHUNK_FRAMES` frames
handed to a thread pool (LAME releases the GIL; the task also converts, spills and measures
its chunk) and spliced gaplessly at the end; FLAC, AAC (M4A) and Opus (Ogg) through FFmpeg's
encoders as each stretch arrives, one pool task at a time per stem, in order (so a song's stems
encode in parallel; an AAC or Opus stream cannot be cut and spliced like MP3's frames); WAV
inline. Demucs' default clip prevention ("rescale": divide the whole stem by 1.01 x its peak
when the peak reaches 1/1.01) needs the peak of the whole stem, known only at the end:
stretches are encoded as if it will not be needed (it rarely is: then the output is the
one-shot encode's), kept in a spill file, and re-encoded from it, scaled, when it is.
"""
import collections
import io
import os
import shutil
import struct
import tempfile
import threading
import time
import typing as tp
from concurrent.futures import Executor, Future
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from . import mp3
from .audio import peak
from .errors import InvalidParameterError
from .options import WAV_DEPTHS

# MP3 chunks of one stem queued or encoding at a time, at least: when the encoder lags behind
# the model, `write` waits instead of piling up PCM (a 900 s song would otherwise queue
# ~600 MB). A `StemFile` may queue more (`max_pending`) so that one song's stems keep every
# encoding thread busy (a GPU delivers a whole song's windows within a second).
MAX_PENDING_CHUNKS = 2
CLIP_HEADROOM = 1.01  # `demucs.audio.prevent_clip`'s rescale divides by 1.01 x the peak


def pcm_int(audio: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Planar float `[C, n]` x `scale` -> interleaved integers `[n, C]` of `bits` bits,
    clipped as Demucs does (`[-1, 1]` maps to +-(2**(bits-1) - 1))."""
    full = 2**(bits - 1) - 1
    dtype = "<i2" if bits == 16 else "<i4"
    clipped = np.empty(audio.shape[::-1], np.float32)
    np.clip((audio * scale if scale != 1 else audio).T, -1, 1, out=clipped)
    clipped *= full
    return clipped.astype(dtype)


def wav_header(channels: int, samplerate: int, depth: str, payload_bytes: int) -> bytes:
    """RIFF/WAVE header for `payload_bytes` of PCM (int16/int24) or float32 samples."""
    bits, tag = {"int16": (16, 1), "int24": (24, 1), "float32": (32, 3)}[depth]
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, samplerate, samplerate * block, block, bits)
    size = 4 + 8 + len(fmt) + 8 + payload_bytes
    return (b"RIFF" + struct.pack("<I", size) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt))
            + fmt + b"data" + struct.pack("<I", payload_bytes))


def wav_samples(audio: np.ndarray, scale: float, depth: str) -> bytes:
    """Planar float `[C, n]` -> the WAV payload bytes (interleaved) of that stretch."""
    if depth == "int16":
        return pcm_int(audio, scale, 16).tobytes()
    if depth == "int24":
        return pcm_int(audio, scale, 24).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    if depth == "float32":
        return np.ascontiguousarray((audio * scale).T, "<f4").tobytes()
    raise InvalidParameterError(f"wav depth must be one of {WAV_DEPTHS}, got {depth!r}")


class EncodeClock:
    """Seconds spent encoding one song's stems, from every thread that encodes them: CPU
    seconds (`cpu`) and wall time from the first task's start to the last one's end (`wall`)."""

    def __init__(self):
        self.cpu = 0.
        self.first: tp.Optional[float] = None
        self.last: tp.Optional[float] = None
        self._lock = threading.Lock()

    def timed(self, fn: tp.Callable, *args):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.cpu += time.thread_time() - cpu
                self.first = start if self.first is None else min(self.first, start)
                self.last = max(self.last or 0., time.perf_counter())

    @property
    def wall(self) -> float:
        return 0. if self.first is None or self.last is None else self.last - self.first


# Formats FFmpeg encodes stretch by stretch: (encoder, container, frame format, encoder rate;
# None: the stem's). FFmpeg's AAC encoder takes planar float; Opus runs at 48 kHz only, and
# PyAV's encoder resamples the 44.1 kHz frames it is given.
STREAMED = {"flac": ("flac", "flac", "s16", None), "m4a": ("aac", "ipod", "flt", None),
            "opus": ("libopus", "ogg", "flt", 48000)}
# stretches of one stem waiting for their encoding task, at most: then `write` waits
MAX_QUEUED_STRETCHES = 8


class _Streamed:
    """One FLAC (16-bit), AAC or Opus stream, fed stretch by stretch in order; `bitrate` in
    kbps for the lossy ones."""

    def __init__(self, fmt: str, channels: int, samplerate: int, bitrate: int = 0):
        codec, container, self._format, rate = STREAMED[fmt]
        self._buffer = io.BytesIO()
        self._layout = "mono" if channels == 1 else "stereo"
        # bitexact: no random Ogg serial number, no encoder version strings, so that the
        # same stem is the same file (a rerun, a cache, a test against a one-shot encode)
        self._container = av.open(self._buffer, mode="w", format=container,
                                  options={"fflags": "+bitexact"})
        self._stream = self._container.add_stream(codec, rate=rate or samplerate,
                                                  layout=self._layout,
                                                  options={"flags": "+bitexact"})
        if self._format == "s16":
            self._stream.format = "s16"
        if fmt != "flac":
            self._stream.bit_rate = bitrate * 1000
        self._rate = samplerate
        self._fed = 0

    def write(self, audio: np.ndarray, scale: float) -> None:
        """Float32 `[C, n]` x `scale`, next."""
        if self._format == "s16":
            samples = pcm_int(audio, scale, 16).reshape(1, -1)
        else:
            samples = (np.ascontiguousarray(audio.T) * np.float32(scale)).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format=self._format, layout=self._layout)
        frame.sample_rate = self._rate
        frame.pts, frame.time_base = self._fed, Fraction(1, self._rate)
        self._fed += audio.shape[1]
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._buffer.getvalue()


class StemFile:
    """One output file (`vocals.mp3`, `no_vocals.wav`...) of `num_samples` samples of
    `channels` channels, written stretch by stretch with `write`, bytes from `finish`.

    `fmt` is "mp3", "wav", "flac", "m4a" or "opus". MP3 chunks are tasks on `pool`, at most
    `max_pending` of them queued or running at a time; each task also keeps its part of the
    stem (the spill file, the peak), so the caller's thread only hands stretches over. FLAC,
    AAC and Opus stretches queue for one task at a time on `pool` that encodes them in order
    (at most `MAX_QUEUED_STRETCHES` waiting); WAV is written in `write`. The spill file
    (planar: each channel's samples in a row) lives in `spill_dir` until `close`. `clip` is
    Demucs' clip mode: "rescale" the whole stem when it would clip, "clamp" its samples to
    [-1, 1], or "none" (integer formats clip anyway; float32 WAV keeps the samples).
    """

    def __init__(self, fmt: str, num_samples: int, channels: int, samplerate: int,
                 pool: Executor, spill_dir: str, bitrate: int = 192, wav_depth: str = "int16",
                 clock: tp.Optional[EncodeClock] = None, clip: str = "rescale",
                 max_pending: int = MAX_PENDING_CHUNKS, quality: int = mp3.DEFAULT_QUALITY):
        if fmt not in ("mp3", "wav", *STREAMED):
            raise InvalidParameterError(f"unknown format {fmt!r}")
        self.fmt, self.num_samples, self.channels = fmt, num_samples, channels
        self.max_pending = max(max_pending, 1)
        self.clip = clip
        self.clock = clock or EncodeClock()
        self.samplerate, self.bitrate, self.wav_depth = samplerate, bitrate, wav_depth
        self.quality = quality  # LAME's, for MP3
        self._pool = pool
        self.written = 0
        self._peaks: tp.List[float] = []  # of the stretches kept so far (list.append: atomic)
        self._spill_fd: tp.Optional[int]
        self._spill_fd, self.spill_path = tempfile.mkstemp(suffix=".f32", dir=spill_dir)
        self._spill_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._start_encoder()

    def _start_encoder(self) -> None:
        self._chunks: tp.List[Future] = []
        self._pending: tp.Deque[Future] = collections.deque()
        self._bounds = mp3.chunk_bounds(self.num_samples)
        self._owned = mp3.chunk_owned(self.num_samples)
        self._pieces: tp.Deque[tp.Tuple[int, np.ndarray]] = collections.deque()
        self._fed = 0  # samples handed to this encoder
        self._wav: tp.List[bytes] = []
        self._streamed = (_Streamed(self.fmt, self.channels, self.samplerate, self.bitrate)
                          if self.fmt in STREAMED else None)
        # stretches `(start, audio, scale, keep)` waiting for the stem's encoding task
        self._queued: tp.Deque[tp.Tuple[int, np.ndarray, float, bool]] = collections.deque()
        self._draining: tp.Optional[Future] = None  # the task; submitted by `write`'s thread
        self._drain_running = False

    def write(self, audio: np.ndarray) -> None:
        """The next stretch: float32 `[C, n]`, continuing where the last one ended. MP3 holds
        on to it until its chunks are encoded: it must not change afterwards."""
        self.written += audio.shape[1]
        self._feed(audio, 1., keep=True)

    def _feed(self, audio: np.ndarray, scale: float, keep: bool) -> None:
        """Encode `audio` `[C, n]` x `scale` next; `keep`: also spill it and note its peak."""
        start = self._fed
        self._fed += audio.shape[1]
        if self.fmt == "mp3":
            self._pieces.append((start, audio))
            self._submit_chunks(scale, keep)
        elif self._streamed is not None:
            self._queue(start, audio, scale, keep)
        else:
            self.clock.timed(self._encode_stretch, start, audio, scale, keep)

    def _encode_stretch(self, start: int, audio: np.ndarray, scale: float,
                        keep: bool) -> None:
        audio = self._clamped(audio)
        if keep:
            self._keep(start, audio)
        if self._streamed is not None:
            self._streamed.write(audio, scale)
        else:
            self._wav.append(wav_samples(audio, scale, self.wav_depth))

    def _queue(self, start: int, audio: np.ndarray, scale: float, keep: bool) -> None:
        """Queue a stretch for the stem's encoding task, starting one when none runs; waits
        while `MAX_QUEUED_STRETCHES` are queued (the encoder lags behind the model)."""
        while len(self._queued) >= MAX_QUEUED_STRETCHES and self._drain_running:
            assert self._draining is not None
            self._draining.result()
        with self._queue_lock:
            self._queued.append((start, audio, scale, keep))
            start_task, self._drain_running = not self._drain_running, True
        if start_task:  # outside the lock: an inline pool runs the task right here
            self._draining = self._pool.submit(self._drain)

    def _drain(self) -> None:
        """A pool task: encode the queued stretches in order until none is left."""
        while True:
            with self._queue_lock:
                if not self._queued:
                    self._drain_running = False
                    return
                stretch = self._queued.popleft()
            self.clock.timed(self._encode_stretch, *stretch)

    def _wait_drained(self) -> None:
        """Wait for the encoding task (raising what it raised). Only `write`'s thread submits
        one, and only once the last has ended: the latest is the only one that can run."""
        if self._draining is not None:
            self._draining.result()

    def _submit_chunks(self, scale: float, keep: bool) -> None:
        """Hand each chunk whose samples are all in to the pool (waiting while `max_pending`
        are queued or running), then let go of the stretches no later chunk needs."""
        while len(self._chunks) < len(self._bounds):
            index = len(self._chunks)
            start, stop = self._bounds[index]
            if stop > self._fed:
                return
            pieces = [(at, piece) for at, piece in self._pieces
                      if at < stop and at + piece.shape[1] > start]
            while len(self._pending) >= self.max_pending:
                self._pending.popleft().result()
            chunk = self._pool.submit(self.clock.timed, self._encode_chunk, pieces, start,
                                      stop, self._owned[index], scale, keep)
            self._chunks.append(chunk)
            self._pending.append(chunk)
            following = index + 1
            needed_from = (self._bounds[following][0] if following < len(self._bounds)
                           else self._fed)
            while self._pieces and _end(self._pieces[0]) <= needed_from:
                self._pieces.popleft()

    def _encode_chunk(self, pieces: tp.List[tp.Tuple[int, np.ndarray]], start: int,
                      stop: int, owned: tp.Tuple[int, int], scale: float,
                      keep: bool) -> mp3.Frames:
        """A pool task: chunk `[start, stop)` from `pieces` (stretches `(first sample,
        [C, n])`) encoded; with `keep`, its `owned` samples (those no other chunk has) are
        spilled and their peak noted."""
        audio = self._clamped(_samples(pieces, start, stop))
        if keep:
            self._keep(owned[0], audio[:, owned[0] - start:owned[1] - start])
        return mp3.encode_chunk(pcm_int(audio, scale, 16), start, self.samplerate,
                                self.bitrate, self.quality)

    def _clamped(self, audio: np.ndarray) -> np.ndarray:
        return np.clip(audio, -1., 1.) if self.clip == "clamp" else audio

    def _keep(self, start: int, audio: np.ndarray) -> None:
        """Spill `audio` `[C, n]` (samples from `start`) and note its peak; nothing once the
        file is closed (a pool task may outlive a cancelled song)."""
        with self._spill_lock:
            if self._spill_fd is None:
                return
            for channel, row in enumerate(audio):
                _write_all(self._spill_fd, np.ascontiguousarray(row),
                           4 * (channel * self.num_samples + start))
        self._peaks.append(peak(audio))

    @property
    def peak(self) -> float:
        """The largest |sample| kept so far (every sample's once `finish` has waited)."""
        return max(self._peaks, default=0.)

    @property
    def scale(self) -> float:
        """`prevent_clip`'s rescale factor, known once every sample is kept (1 unless the
        clip mode is "rescale")."""
        if self.clip != "rescale":
            return 1.
        return 1. / max(CLIP_HEADROOM * self.peak, 1.)

    def finish(self) -> bytes:
        """The encoded file; re-encodes from the spill file when the stem must be rescaled."""
        if self.written != self.num_samples:
            raise RuntimeError(f"{self.written} of {self.num_samples} samples written")
        for chunk in self._chunks:  # every chunk kept: the peak is the stem's
            chunk.result()
        self._wait_drained()
        if self.scale != 1.:
            self._start_encoder()
            self.clock.timed(self._reencode, self.scale)
            self._wait_drained()
        return self.clock.timed(self._result)

    def _spilled(self) -> np.ndarray:
        """Every sample written, `[C, T]` float32, mapped from the spill file."""
        return np.memmap(self.spill_path, np.float32, "r",
                         shape=(self.channels, self.num_samples))

    def _reencode(self, scale: float) -> None:
        spilled = self._spilled()
        step = mp3.CHUNK_FRAMES * 1152
        for start in range(0, self.num_samples, step):
            self._feed(np.array(spilled[:, start:start + step]), scale, keep=False)
        del spilled

    def _result(self) -> bytes:
        if self.fmt == "wav":
            payload = b"".join(self._wav)
            return wav_header(self.channels, self.samplerate, self.wav_depth,
                              len(payload)) + payload
        if self._streamed is not None:
            return self._streamed.finish()
        chunks = [chunk.result() for chunk in self._chunks]
        if len(chunks) == 1:
            return mp3.info_frame(chunks[0].data, self.num_samples) + chunks[0].data
        try:
            return mp3.join_chunks(chunks, self.num_samples)
        except mp3.SpliceError:  # rare: encode the whole stem in one go
            return self._one_shot()

    def _one_shot(self) -> bytes:
        return mp3.encode_mp3(pcm_int(np.asarray(self._spilled()), self.scale, 16),
                              self.samplerate, self.bitrate, self.quality)

    def close(self) -> None:
        """Cancel what is still queued and delete the spill file."""
        for chunk in self._chunks:
            chunk.cancel()
        self._pieces.clear()
        with self._spill_lock:  # a running task writes no more
            if self._spill_fd is not None:
                os.close(self._spill_fd)
                os.unlink(self.spill_path)
                self._spill_fd = None


def _samples(pieces: tp.List[tp.Tuple[int, np.ndarray]], start: int, stop: int) -> np.ndarray:
    """Samples `[start, stop)`, `[C, n]`, of consecutive stretches `(first sample, [C, m])`
    that cover them: a view when one stretch does."""
    parts = [piece[:, max(start - at, 0):stop - at] for at, piece in pieces]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _end(piece: tp.Tuple[int, np.ndarray]) -> int:
    return piece[0] + piece[1].shape[1]


def _write_all(fd: int, array: np.ndarray, offset: int) -> None:
    """Write a C-contiguous array's bytes to `fd` at `offset`, all of them (`os.pwrite` may
    write fewer)."""
    view = memoryview(array).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class Inline(Executor):
    """An executor that runs each task at once, in the caller's thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def planar(wav: tp.Any) -> np.ndarray:
    """`[C, T]` float array (or CPU tensor) -> `[C, T]` C-contiguous float32 array (no copy
    when it is one: a stem of the stems `[S, C, T]` is)."""
    return np.ascontiguousarray(wav, dtype=np.float32)


def prevent_clip(wav: tp.Any) -> tp.Any:
    """Demucs' default clip mode on a whole stem `[C, T]` (an array or a tensor, returned as
    one): rescale when it would clip."""
    return wav / max(CLIP_HEADROOM * float(abs(wav).max()), 1.)


def encode_stem(wav: tp.Any, samplerate: int, fmt: str = "mp3", bitrate: int = 192,
                wav_depth: str = "int16", pool: tp.Optional[Executor] = None,
                quality: int = mp3.DEFAULT_QUALITY) -> bytes:
    """Encode a whole stem `[C, T]` (an array or a CPU tensor) in one go, with
    `prevent_clip`, as a `StemFile` does it
    stretch by stretch (MP3 chunks on `pool` when given; `quality`: LAME's)."""
    with tempfile.TemporaryDirectory() as spill_dir:
        stem = StemFile(fmt, wav.shape[-1], wav.shape[0], samplerate, pool or Inline(),
                        spill_dir, bitrate, wav_depth, quality=quality)
        try:
            stem.write(planar(wav))
            return stem.finish()
        finally:
            stem.close()


SPILL_ROOT = Path(tempfile.gettempdir()) / "serve_graph_spill"


def spill_dir() -> Path:
    """This process's folder for spill files, `<tmp>/serve_graph_spill/<pid>`: a process that
    dies (a killed replica) leaves its folder behind, and `sweep_spill` removes it."""
    folder = SPILL_ROOT / str(os.getpid())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sweep_spill() -> int:
    """Delete the spill folders of processes that are gone; returns how many."""
    removed = 0
    for folder in SPILL_ROOT.glob("*"):
        if folder.name.isdigit() and not Path(f"/proc/{folder.name}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
