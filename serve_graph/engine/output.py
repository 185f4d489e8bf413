"""Stem files written while the song is still being separated.

A `StemFile` receives one stem's final audio stretch by stretch, in order, as float32
interleaved `[n, C]` arrays, and encodes as it goes: MP3 in chunks of `mp3.CHUNK_FRAMES` frames
handed to a thread pool (LAME releases the GIL) and spliced gaplessly at the end; WAV and FLAC
as each stretch arrives. Demucs' default clip prevention ("rescale": divide the whole stem by
1.01 x its peak when the peak reaches 1/1.01) needs the peak of the whole stem, known only at
the end: stretches are encoded as if it will not be needed (it rarely is: then the output is
the one-shot encode's), kept in a spill file, and re-encoded from it, scaled, when it is.
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
from pathlib import Path

import av
import numpy as np
import torch as th

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
    """Interleaved float `[n, C]` x `scale` -> integers of `bits` bits, clipped as Demucs does
    (`[-1, 1]` maps to +-(2**(bits-1) - 1))."""
    full = 2**(bits - 1) - 1
    dtype = "<i2" if bits == 16 else "<i4"
    clipped = np.clip(audio * scale if scale != 1 else audio, -1, 1)
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
    """Interleaved float `[n, C]` -> the WAV payload bytes of that stretch."""
    if depth == "int16":
        return pcm_int(audio, scale, 16).tobytes()
    if depth == "int24":
        return pcm_int(audio, scale, 24).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    if depth == "float32":
        return (audio * scale).astype("<f4").tobytes()
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


class _Flac:
    """A FLAC (16-bit) stream fed stretch by stretch, in order."""

    def __init__(self, channels: int, samplerate: int):
        self._buffer = io.BytesIO()
        self._layout = "mono" if channels == 1 else "stereo"
        self._container = av.open(self._buffer, mode="w", format="flac")
        self._stream = self._container.add_stream("flac", rate=samplerate, layout=self._layout)
        self._stream.format = "s16"
        self._rate = samplerate

    def write(self, audio: np.ndarray, scale: float) -> None:
        frame = av.AudioFrame.from_ndarray(pcm_int(audio, scale, 16).reshape(1, -1),
                                           format="s16", layout=self._layout)
        frame.sample_rate = self._rate
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

    `fmt` is "mp3", "wav" or "flac"; MP3 chunks are encoded on `pool`, at most `max_pending`
    of them queued or running at a time. The spill file lives in
    `spill_dir` until `close`. `clip` is Demucs' clip mode: "rescale" the whole stem when it
    would clip, "clamp" its samples to [-1, 1], or "none" (integer formats clip anyway; float32
    WAV keeps the samples).
    """

    def __init__(self, fmt: str, num_samples: int, channels: int, samplerate: int,
                 pool: Executor, spill_dir: str, bitrate: int = 192, wav_depth: str = "int16",
                 clock: tp.Optional[EncodeClock] = None, clip: str = "rescale",
                 max_pending: int = MAX_PENDING_CHUNKS):
        self.fmt, self.num_samples, self.channels = fmt, num_samples, channels
        self.max_pending = max(max_pending, 1)
        self.clip = clip
        self.clock = clock or EncodeClock()
        self.samplerate, self.bitrate, self.wav_depth = samplerate, bitrate, wav_depth
        self._pool = pool
        self.written = 0
        self.peak = 0.
        self._spill_fd, self.spill_path = tempfile.mkstemp(suffix=".f32", dir=spill_dir)
        self._start_encoder()

    def _start_encoder(self) -> None:
        self._chunks: tp.List[Future] = []
        self._pending: tp.Deque[Future] = collections.deque()
        self._bounds = mp3.chunk_bounds(self.num_samples)
        self._held = np.zeros((0, self.channels), np.float32)  # samples from `_held_from`
        self._held_from = 0
        self._wav: tp.List[bytes] = []
        self._flac = _Flac(self.channels, self.samplerate) if self.fmt == "flac" else None

    def write(self, audio: np.ndarray) -> None:
        """The next stretch: float32 `[n, C]`, continuing where the last one ended."""
        if self.clip == "clamp":
            audio = np.clip(audio, -1., 1.)
        _write_all(self._spill_fd, np.ascontiguousarray(audio, np.float32))
        self.peak = max(self.peak, peak(audio))
        self.written += audio.shape[0]
        self.clock.timed(self._encode, audio, 1.)

    def _encode(self, audio: np.ndarray, scale: float) -> None:
        if self.fmt == "wav":
            self._wav.append(wav_samples(audio, scale, self.wav_depth))
        elif self.fmt == "flac":
            assert self._flac is not None
            self._flac.write(audio, scale)
        elif self.fmt == "mp3":
            self._hold_mp3(audio, scale)
        else:
            raise InvalidParameterError(f"unknown format {self.fmt!r}")

    def _hold_mp3(self, audio: np.ndarray, scale: float) -> None:
        """Keep samples until the next chunk's range is complete, then hand it to the pool."""
        self._held = np.concatenate([self._held, audio])
        end = self._held_from + self._held.shape[0]
        while len(self._chunks) < len(self._bounds) and self._bounds[len(self._chunks)][1] <= end:
            start, stop = self._bounds[len(self._chunks)]
            pcm = pcm_int(self._held[start - self._held_from:stop - self._held_from], scale, 16)
            while len(self._pending) >= self.max_pending:
                self._pending.popleft().result()
            chunk = self._pool.submit(self.clock.timed, mp3.encode_chunk, pcm, start,
                                      self.samplerate, self.bitrate)
            self._chunks.append(chunk)
            self._pending.append(chunk)
            following = len(self._chunks)
            keep_from = self._bounds[following][0] if following < len(self._bounds) else end
            self._held = self._held[keep_from - self._held_from:]
            self._held_from = keep_from

    @property
    def scale(self) -> float:
        """`prevent_clip`'s rescale factor, known once every sample is written (1 unless the
        clip mode is "rescale")."""
        if self.clip != "rescale":
            return 1.
        return 1. / max(CLIP_HEADROOM * self.peak, 1.)

    def finish(self) -> bytes:
        """The encoded file; re-encodes from the spill file when the stem must be rescaled."""
        if self.written != self.num_samples:
            raise RuntimeError(f"{self.written} of {self.num_samples} samples written")
        if self.scale != 1.:
            self._start_encoder()
            self.clock.timed(self._reencode, self.scale)
        return self.clock.timed(self._result)

    def _spilled(self) -> np.ndarray:
        """Every sample written, `[T, C]` float32, mapped from the spill file."""
        return np.memmap(self.spill_path, np.float32, "r",
                         shape=(self.num_samples, self.channels))

    def _reencode(self, scale: float) -> None:
        spilled = self._spilled()
        step = mp3.CHUNK_FRAMES * 1152
        for start in range(0, self.num_samples, step):
            self._encode(np.array(spilled[start:start + step]), scale)
        del spilled

    def _result(self) -> bytes:
        if self.fmt == "wav":
            payload = b"".join(self._wav)
            return wav_header(self.channels, self.samplerate, self.wav_depth,
                              len(payload)) + payload
        if self.fmt == "flac":
            assert self._flac is not None
            return self._flac.finish()
        chunks = [chunk.result() for chunk in self._chunks]
        if len(chunks) == 1:
            return mp3.info_frame(chunks[0].data, self.num_samples) + chunks[0].data
        try:
            return mp3.join_chunks(chunks, self.num_samples)
        except mp3.SpliceError:  # rare: encode the whole stem in one go
            return self._one_shot()

    def _one_shot(self) -> bytes:
        return mp3.encode_mp3(pcm_int(np.asarray(self._spilled()), self.scale, 16),
                              self.samplerate, self.bitrate)

    def close(self) -> None:
        """Cancel what is still queued and delete the spill file."""
        for chunk in self._chunks:
            chunk.cancel()
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            os.unlink(self.spill_path)
            self._spill_fd = None


def _write_all(fd: int, array: np.ndarray) -> None:
    """Write a C-contiguous array's bytes to `fd`, all of them (`os.write` may write fewer)."""
    view = memoryview(array).cast("B")
    while view:
        view = view[os.write(fd, view):]


class Inline(Executor):
    """An executor that runs each task at once, in the caller's thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def interleaved(wav: th.Tensor) -> np.ndarray:
    """`[C, T]` float tensor -> `[T, C]` float32 array."""
    return np.ascontiguousarray(wav.detach().cpu().numpy().T, dtype=np.float32)


def prevent_clip(wav: th.Tensor) -> th.Tensor:
    """Demucs' default clip mode on a whole stem `[C, T]`: rescale when it would clip."""
    return wav / max(CLIP_HEADROOM * float(wav.abs().max()), 1.)


def encode_stem(wav: th.Tensor, samplerate: int, fmt: str = "mp3", bitrate: int = 192,
                wav_depth: str = "int16", pool: tp.Optional[Executor] = None) -> bytes:
    """Encode a whole stem `[C, T]` in one go, with `prevent_clip`, as a `StemFile` does it
    stretch by stretch (MP3 chunks on `pool` when given)."""
    with tempfile.TemporaryDirectory() as spill_dir:
        stem = StemFile(fmt, wav.shape[-1], wav.shape[0], samplerate, pool or Inline(),
                        spill_dir, bitrate, wav_depth)
        try:
            stem.write(interleaved(wav))
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
