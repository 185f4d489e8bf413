"""An MP3 decoded in parts at once: the caller's thread decodes the first run of the stream's
packets while helper processes decode the others, each starting `WARM_UP` packets early and
dropping what those give. An MP3 decoder's state (bit reservoir, IMDCT overlap, synthesis
filterbank) depends on the last few frames only, so every part comes out sample for sample as
one pass gives it (tests/test_split_decode.py holds it to that). Threads cannot share the work:
each frame's Python step in PyAV needs the GIL, and handing it over per frame ate the gain
(benchmarks/RESULTS.md); processes can.

Run as a script (`python split_decode.py IN_FD OUT_FD`), this file is a helper: for each JSON
command on stdin it decodes the packets asked for of the MP3 in memfd IN_FD into memfd OUT_FD
(planar float32) and answers one JSON line. It imports only PyAV and NumPy, so it starts in
~0.1 s.
"""
import json
import logging
import mmap
import os
import select
import subprocess
import sys
import threading
import typing as tp
import weakref

import av
import numpy as np

WARM_UP = 32  # packets decoded before a part's first one, their output dropped
MIN_PACKETS = 1000  # ~26 s: a shorter song decodes in one pass (each helper demuxes it all)
CODECS = ("mp3float",)  # FFmpeg's MP3 decoder (float output, as the one pass gives it)
FRAME_SAMPLES = 1152  # the most samples per channel one MP3 packet decodes to
PART_TIMEOUT_S = 60.  # a helper silent this long is stopped and the song decoded in one pass
logger = logging.getLogger(__name__)


def audio_packets(container) -> list:
    """The first audio stream's packets, without the empty one that ends the stream."""
    return [packet for packet in container.demux(container.streams.audio[0]) if packet.size]


def decode_part(container, packets: list, first: int, stop: int, out: np.ndarray) -> int:
    """Decode `packets[first:stop]` with `container`'s audio decoder, after the `WARM_UP`
    packets before `first` (their output and errors dropped: their bit reservoir may lie
    before them), into `out` `[C, n]` from its start; the last part also drains the decoder.
    Returns the samples written. Raises `av.FFmpegError` for corrupt packets, `ValueError`
    for frames that do not fit `out`."""
    codec = container.streams.audio[0].codec_context
    written = 0
    for index in range(max(0, first - WARM_UP), stop):
        try:
            frames = codec.decode(packets[index])
        except av.FFmpegError:
            if index < first:
                continue
            raise
        if index >= first:
            for frame in frames:
                written = _put(out, written, frame)
    if stop == len(packets):
        for frame in codec.decode(None):
            written = _put(out, written, frame)
    return written


def _put(out: np.ndarray, at: int, frame) -> int:
    block = frame.to_ndarray()
    end = at + block.shape[-1]
    if block.dtype != np.float32 or block.shape[0] != out.shape[0] or end > out.shape[1]:
        raise ValueError(f"a frame of {block.shape} {block.dtype} does not fit "
                         f"{out.shape} at {at}")
    out[:, at:end] = block
    return end


def _open(fd: int):
    """The MP3 held by memfd `fd` (the demuxer named: nothing is probed)."""
    return av.open(f"/proc/self/fd/{fd}", format="mp3")


def _mapped(fd: int, channels: int, samples: int, writable: bool = False):
    """(mmap, `[channels, samples]` float32 view of memfd `fd`)."""
    buffer = mmap.mmap(fd, channels * samples * 4,
                       prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    return buffer, np.ndarray((channels, samples), np.float32, buffer)


class HelperLost(RuntimeError):
    """A helper process died, stopped answering or answered out of turn."""


class _Helper:
    """One helper process and the memfd it writes its part into."""

    def __init__(self, input_fd: int):
        self._input_fd = input_fd
        self._output_fd = os.memfd_create("serve_graph_mp3_part")
        self._size = 0
        self._process: tp.Optional[subprocess.Popen] = None
        self._shape = (0, 0)
        self._start()

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(self._input_fd),
             str(self._output_fd)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            pass_fds=(self._input_fd, self._output_fd))

    def ask(self, first: int, stop: tp.Optional[int], estimate: int, channels: int) -> None:
        """Have packets `[first, stop)` decoded (None: to the end of the stream, which should
        have about `estimate` packets), with room for `FRAME_SAMPLES` a packet and a tenth
        more at the end."""
        if self._process is None or self._process.poll() is not None:
            self.stop()  # a dead one's pipes closed
            self._start()
        packets = (stop if stop is not None else estimate + estimate // 10 + WARM_UP) - first
        self._shape = (channels, max(packets, 1) * FRAME_SAMPLES)
        size = channels * self._shape[1] * 4
        if not size <= self._size <= 2 * size:  # kept from song to song: its pages stay warm
            os.ftruncate(self._output_fd, size)
            self._size = size
        command = {"first": first, "stop": stop, "channels": channels,
                   "samples": self._shape[1]}
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(json.dumps(command).encode() + b"\n")
        self._process.stdin.flush()

    def answer(self, out: np.ndarray, packets: int) -> int:
        """Wait for the part, copy it into `out` `[C, n]` from its start; its samples. The
        helper must have found the stream's `packets` too."""
        reply = self._reply()
        if "error" in reply:
            raise ValueError(f"decode helper: {reply['error']}")
        if reply["packets"] != packets:
            raise ValueError(f"the helper found {reply['packets']} packets, this process "
                             f"{packets}")
        samples = int(reply["samples"])
        if samples > out.shape[1]:
            raise ValueError(f"a part of {samples} samples does not fit {out.shape[1]}")
        buffer, part = _mapped(self._output_fd, *self._shape)
        try:
            out[:, :samples] = part[:, :samples]
        finally:
            del part
            buffer.close()
        return samples

    def drop_answer(self) -> None:
        """Read the part's answer and drop it (its song failed elsewhere)."""
        try:
            self._reply()
        except HelperLost:
            pass

    def _reply(self) -> dict:
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], PART_TIMEOUT_S)
        line = self._process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise HelperLost("the decode helper died or did not answer")
        return json.loads(line)

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for pipe in (self._process.stdin, self._process.stdout):
                if pipe is not None:
                    pipe.close()
            self._process = None

    def close(self) -> None:
        self.stop()
        os.close(self._output_fd)


class SplitDecoder:
    """`helpers` helper processes (started now, restarted when one dies) that decode an MP3's
    later parts while the caller decodes its first: `audio.decode(..., split=...)` uses them.
    One song at a time: a call that finds them busy gets None and decodes in one pass.

    A song's samples go into memory that the caller may hand back with `recycle` once it has
    put them away (Decode does, after `ray.put`): the next song then decodes into pages already
    there. Fresh memory is not free: the kernel zeroes it, and on a VM whose balloon takes back
    freed pages (this one) a fresh 76 MB costs up to 0.15 s after a few idle seconds."""

    def __init__(self, helpers: int = 1):
        if helpers < 1:
            raise ValueError(f"a SplitDecoder needs at least one helper, not {helpers}")
        self._input_fd = os.memfd_create("serve_graph_mp3")
        self._helpers = [_Helper(self._input_fd) for _ in range(helpers)]
        self._lock = threading.Lock()
        self._memory = _Recycled()

    def decode(self, data: bytes, stream, samplerate: int, expected: int, exact: bool,
               limit: tp.Optional[int]) -> tp.Optional[np.ndarray]:
        """The samples `[C, T]` float32 of the MP3 `data` whose audio stream is `stream`
        (`expected` samples long, `exact`ly so when its header says), or None when it is not
        one to decode in parts (another codec, a rate to convert, more than two channels, a
        short song, possibly over `limit` samples, the helpers busy) or a part failed: decode
        it in one pass then, which also raises the error a corrupt file deserves."""
        codec = stream.codec_context
        if (codec.name not in CODECS or codec.sample_rate != samplerate or
                codec.channels not in (1, 2) or expected < MIN_PACKETS * FRAME_SAMPLES or
                not self._lock.acquire(blocking=False)):
            return None
        try:
            return self._decode(data, codec.channels, expected, exact, limit)
        except (av.FFmpegError, ValueError, OSError, HelperLost) as exc:
            logger.warning("decoding in parts failed (%s); decoding in one pass", exc)
            return None
        finally:
            self._lock.release()

    def _decode(self, data: bytes, channels: int, expected: int, exact: bool,
                limit: tp.Optional[int]) -> tp.Optional[np.ndarray]:
        """Parts cut where the header's length puts them, asked of the helpers before this
        thread demuxes the stream for its own part (each process demuxes it all: ~0.02 s)."""
        os.ftruncate(self._input_fd, len(data))
        os.pwrite(self._input_fd, data, 0)
        estimate = expected // FRAME_SAMPLES + 1  # packets
        parts = len(self._helpers) + 1
        cuts = [estimate * k // parts for k in range(parts)] + [None]
        waiting: tp.List[_Helper] = []
        try:
            for helper, first, stop in zip(self._helpers, cuts[1:], cuts[2:]):
                helper.ask(first, stop, estimate, channels)
                waiting.append(helper)
            with _open(self._input_fd) as container:
                packets = audio_packets(container)
                room = expected if exact else len(packets) * FRAME_SAMPLES
                if limit is not None and room > limit:
                    return None
                out = self._memory.take(channels, room)
                written = decode_part(container, packets, 0, min(cuts[1], len(packets)), out)
            while waiting:
                written += waiting.pop(0).answer(out[:, written:], len(packets))
        finally:
            for helper in waiting:  # the song goes another way: their answers are dropped
                helper.drop_answer()
        return out if written == room else np.ascontiguousarray(out[:, :written])

    def recycle(self, samples: np.ndarray) -> None:
        """`samples` (what `decode` gave) are put away and read no more: their memory goes to
        the next song."""
        self._memory.give_back(samples)

    def close(self) -> None:
        for helper in self._helpers:
            helper.close()
        os.close(self._input_fd)


class _Recycled:
    """Song-sized float32 arrays lent out and, once given back, lent again: one kept spare
    (dropped for a fresh one when more than twice the size needed). One never given back is
    freed with the last view of it: the lent ones are held weakly."""

    def __init__(self):
        self._lent: "weakref.WeakValueDictionary[int, np.ndarray]" = (
            weakref.WeakValueDictionary())  # by address
        self._spare: tp.Optional[np.ndarray] = None
        self._lock = threading.Lock()

    def take(self, channels: int, samples: int) -> np.ndarray:
        """An uninitialised `[channels, samples]` float32 array, C-contiguous."""
        size = channels * samples
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None or not size <= spare.size <= 2 * size:
            spare = np.empty(size, np.float32)
        with self._lock:
            self._lent[spare.ctypes.data] = spare
        return spare[:size].reshape(channels, samples)

    def give_back(self, samples: np.ndarray) -> None:
        with self._lock:
            buffer = self._lent.pop(samples.ctypes.data, None)
            if buffer is not None:
                self._spare = buffer



def _serve(input_fd: int, output_fd: int) -> None:
    """The helper's loop: one command per line, one answer per line, until stdin closes."""
    for line in sys.stdin.buffer:
        try:
            reply = _decode_command(input_fd, output_fd, json.loads(line))
        except Exception as exc:  # noqa: BLE001 - any failure: the caller decodes in one pass
            reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        sys.stdout.buffer.write(json.dumps(reply).encode() + b"\n")
        sys.stdout.buffer.flush()


def _decode_command(input_fd: int, output_fd: int, command: dict) -> dict:
    with _open(input_fd) as container:
        packets = audio_packets(container)
        stop = len(packets) if command["stop"] is None else min(command["stop"], len(packets))
        buffer, out = _mapped(output_fd, command["channels"], command["samples"], writable=True)
        try:
            samples = decode_part(container, packets, min(command["first"], stop), stop, out)
        finally:
            del out
            buffer.close()
    return {"samples": samples, "packets": len(packets)}


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
