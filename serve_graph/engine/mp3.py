"""MP3 encoding with `lameenc`, made gapless with a LAME "Info" tag.

`lameenc` returns bare MPEG audio frames: a decoder then plays LAME's 576-sample encoder delay
and the end padding as audio, so stems come out 25+ ms late and longer than the song. LAME's
command line writes an Info frame in front that records both, and FFmpeg, browsers and players
trim them. `encode_mp3` writes the same frame, so a decoded stem lines up with the input sample
for sample.
"""
import struct
import typing as tp

import lameenc
import numpy as np

from .options import DEFAULT_MP3_QUALITY as DEFAULT_QUALITY  # LAME's -q as Demucs sets it

ENCODER_DELAY = 576  # samples LAME adds in front (ENCDELAY), without resampling
_BITRATES = {  # kbps by bitrate index, MPEG-1 / MPEG-2(.5) Layer III
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_SAMPLERATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


class FrameHeader(tp.NamedTuple):
    version_bits: int  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    bitrate_kbps: int
    samplerate: int
    mono: bool
    size: int  # bytes, header included
    samples: int  # samples per channel in the frame

    @property
    def side_info_size(self) -> int:
        if self.version_bits == 3:
            return 17 if self.mono else 32
        return 9 if self.mono else 17


def parse_header(data: bytes, pos: int = 0) -> FrameHeader:
    """Parse the Layer III frame header at `data[pos:pos + 4]`."""
    word, = struct.unpack(">I", data[pos:pos + 4])
    if word >> 21 != 0x7FF or (word >> 17) & 3 != 1:
        raise ValueError(f"no MPEG Layer III frame at byte {pos}")
    version_bits = (word >> 19) & 3
    mpeg1 = version_bits == 3
    bitrate = _BITRATES[1 if mpeg1 else 2][(word >> 12) & 0xF]
    samplerate = _SAMPLERATES[version_bits][(word >> 10) & 3]
    padding = (word >> 9) & 1
    mono = (word >> 6) & 3 == 3
    samples = 1152 if mpeg1 else 576
    size = (samples // 8) * bitrate * 1000 // samplerate + padding
    return FrameHeader(version_bits, bitrate, samplerate, mono, size, samples)


def count_frames(data: bytes) -> int:
    """Number of frames in a stream of bare MPEG audio frames."""
    pos = frames = 0
    while pos + 4 <= len(data):
        pos += parse_header(data, pos).size
        frames += 1
    return frames


def _crc16(data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0xA001), as LAME computes its tag CRC."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def info_frame(audio: bytes, num_samples: int, delay: int = ENCODER_DELAY) -> bytes:
    """A silent frame holding a Xing "Info" header and LAME tag for the CBR frames `audio`,
    which encode `num_samples` samples per channel after `delay` samples of encoder delay."""
    first = parse_header(audio)
    header = bytearray(audio[:4])
    header[2] &= ~0x02  # no padding slot: the frame size is then exact
    frame = bytearray(parse_header(bytes(header) + b"\0" * 4).size)
    frame[:4] = header
    frames = count_frames(audio)
    padding = frames * first.samples - delay - num_samples
    if not 0 <= padding < 4096 or delay >= 4096:
        raise ValueError(f"delay {delay} / padding {padding} do not fit a LAME tag")
    toc = bytes(i * 256 // 100 for i in range(100))
    xing = (b"Info" + struct.pack(">III", 0x0F, frames, len(frame) + len(audio)) + toc
            + struct.pack(">I", 0))
    lame = (b"LAME3.100" + bytes([0x01, 0]) + bytes(4 + 2 + 2 + 1)
            + bytes([min(first.bitrate_kbps, 255)])
            + (delay << 12 | padding).to_bytes(3, "big") + bytes(1 + 1 + 2)
            + struct.pack(">IH", len(frame) + len(audio), 0))
    start = 4 + first.side_info_size
    tag = xing + lame
    frame[start:start + len(tag)] = tag
    crc_at = start + len(tag)
    frame[crc_at:crc_at + 2] = struct.pack(">H", _crc16(bytes(frame[:crc_at])))
    return bytes(frame)


def encode_mp3(pcm16: np.ndarray, samplerate: int, bitrate: int = 192,
               quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode interleaved int16 samples `[T, C]` at `samplerate` Hz as a gapless CBR MP3."""
    audio = encode_frames(pcm16, samplerate, bitrate, quality)
    return info_frame(audio, pcm16.shape[0]) + audio


# --- Chunked encoding: a long stem cut into chunks that encode in parallel, spliced gaplessly.
#
# Chunk k covers the frames [b_k, b_k+1) of the whole stream (b_k = k * CHUNK_FRAMES). It is
# encoded from `PRE_ROLL` frames before its first sample (so LAME's filterbank, MDCT and
# psychoacoustic model are warm at the splice) to `POST_ROLL` frames past its last one (so its
# last frames do not see LAME's flush). The splice frame is chosen among `SPLICE_CANDIDATES`
# around b_k+1 where the bit reservoir allows it: frame F of chunk k+1 takes its first
# `main_data_begin` bytes from the frames before it; they are copied into the end of chunk k's
# frames, over the reservoir that chunk k had kept for its own (dropped) frame F.

CHUNK_FRAMES = 256        # frames per chunk: 6.7 s at 44.1 kHz
SPLICE_CANDIDATES = (-2, -1, 0, 1)  # frames around a chunk boundary where a splice may fall
PRE_ROLL = 7              # frames encoded before a chunk (2 candidates + 5 to warm LAME up)
POST_ROLL = 5             # frames encoded past a chunk (1 candidate + 4 away from the flush)


class SpliceError(ValueError):
    """No frame near a chunk boundary lets the bit reservoirs meet (then encode in one go)."""


def _payload_start(data: bytes, pos: int, header: FrameHeader) -> int:
    """Offset of the main-data area of the frame at `pos` (after header, CRC and side info)."""
    protected = not data[pos + 1] & 1
    return pos + 4 + 2 * protected + header.side_info_size


def _main_data_begin(data: bytes, pos: int, header: FrameHeader) -> int:
    """How many bytes before its own main-data area the frame at `pos` starts its main data."""
    side = _payload_start(data, pos, header) - header.side_info_size
    if header.version_bits == 3:
        return (data[side] << 1) | (data[side + 1] >> 7)
    return data[side]


class Frames:
    """The frames of one encode, numbered from `first` in the whole stream's frame count."""

    def __init__(self, data: bytes, first: int):
        self.data = data
        self.first = first
        self.offsets: tp.List[int] = []
        self.headers: tp.List[FrameHeader] = []
        pos = 0
        while pos + 4 <= len(data):
            header = parse_header(data, pos)
            self.offsets.append(pos)
            self.headers.append(header)
            pos += header.size

    @property
    def end(self) -> int:
        """The stream's frame number after this encode's last frame."""
        return self.first + len(self.offsets)

    def frames(self, start: int, stop: int) -> tp.List[bytearray]:
        """Frames `[start, stop)` (stream numbering) as separate, writable byte arrays."""
        return [bytearray(self._frame(i - self.first)) for i in range(start, stop)]

    def _frame(self, index: int) -> bytes:
        pos = self.offsets[index]
        return self.data[pos:pos + self.headers[index].size]

    def reservoir(self, frame: int) -> int:
        """`main_data_begin` of stream frame `frame`."""
        index = frame - self.first
        return _main_data_begin(self.data, self.offsets[index], self.headers[index])

    def main_data_before(self, frame: int, count: int) -> bytes:
        """The last `count` main-data bytes before stream frame `frame`."""
        return _payload_tail([self._frame(i) for i in range(frame - self.first)], count)


def _payload_spans(frames: tp.Sequence[bytes]) -> tp.Iterator[tp.Tuple[int, int, int]]:
    """`(frame index, start, end)` of each frame's main-data area, last frame first."""
    for index in range(len(frames) - 1, -1, -1):
        frame = frames[index]
        yield index, _payload_start(frame, 0, parse_header(frame)), len(frame)


def _payload_tail(frames: tp.Sequence[bytes], count: int) -> bytes:
    pieces: tp.List[bytes] = []
    for index, start, end in _payload_spans(frames):
        if count <= 0:
            break
        take = min(count, end - start)
        pieces.append(bytes(frames[index][end - take:end]))
        count -= take
    if count > 0:
        raise SpliceError("the reservoir reaches before the first frame")
    return b"".join(reversed(pieces))


def _write_payload_tail(frames: tp.List[bytearray], tail: bytes) -> None:
    """Overwrite the last `len(tail)` main-data bytes of `frames` with `tail`."""
    count = len(tail)
    for index, start, end in _payload_spans(frames):
        if count <= 0:
            return
        take = min(count, end - start)
        frames[index][end - take:end] = tail[count - take:count]
        count -= take
    if count > 0:
        raise SpliceError("the reservoir reaches before the first frame")


def chunk_bounds(num_samples: int, frame_samples: int = 1152,
                 chunk_frames: int = CHUNK_FRAMES) -> tp.List[tp.Tuple[int, int]]:
    """Sample ranges `[start, end)` to encode for each chunk of a stem of `num_samples`
    samples; one chunk, the whole stem, when it is shorter than two chunks."""
    chunk_samples = chunk_frames * frame_samples
    if num_samples < 2 * chunk_samples:
        return [(0, num_samples)]
    chunks = num_samples // chunk_samples  # the last one takes the rest (< 2 chunks)
    bounds = []
    for k in range(chunks):
        first, last = k * chunk_frames, (k + 1) * chunk_frames
        start = max(0, first - PRE_ROLL) * frame_samples
        end = num_samples if k == chunks - 1 else (last + POST_ROLL) * frame_samples
        bounds.append((start, min(end, num_samples)))
    return bounds


def chunk_owned(num_samples: int, frame_samples: int = 1152,
                chunk_frames: int = CHUNK_FRAMES) -> tp.List[tp.Tuple[int, int]]:
    """The samples `[start, end)` each chunk of `chunk_bounds` has to itself (its range less
    the pre- and post-roll that neighbours also encode): they tile the stem."""
    bounds = chunk_bounds(num_samples, frame_samples, chunk_frames)
    starts = [k * chunk_frames * frame_samples for k in range(len(bounds))]
    return list(zip(starts, starts[1:] + [num_samples]))


def encode_frames(pcm16: np.ndarray, samplerate: int, bitrate: int = 192,
                  quality: int = DEFAULT_QUALITY) -> bytes:
    """Bare CBR MP3 frames of interleaved int16 samples `[T, C]` (LAME's 576-sample delay in
    front, its flush at the end). Releases the GIL while encoding."""
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate)
    encoder.set_in_sample_rate(samplerate)
    encoder.set_channels(pcm16.shape[1])
    encoder.set_quality(quality)  # LAME's -q: 0 slowest .. 2 (Demucs) .. 7-9 fastest
    encoder.silence()
    return bytes(encoder.encode(np.ascontiguousarray(pcm16).tobytes()) + encoder.flush())


def encode_chunk(pcm16: np.ndarray, start: int, samplerate: int, bitrate: int = 192,
                 quality: int = DEFAULT_QUALITY, frame_samples: int = 1152) -> Frames:
    """Encode one chunk: `pcm16 [T, C]` are the stem's samples from `start` (a multiple of
    `frame_samples`, as `chunk_bounds` gives)."""
    return Frames(encode_frames(pcm16, samplerate, bitrate, quality), start // frame_samples)


def join_chunks(chunks: tp.Sequence[Frames], num_samples: int,
                chunk_frames: int = CHUNK_FRAMES) -> bytes:
    """Splice chunk encodes (in order, as `chunk_bounds` cut them) into one gapless MP3 of
    `num_samples` samples per channel. Raises `SpliceError` when a boundary has no frame
    where chunk k+1's reservoir fits in chunk k's."""
    out: tp.List[bytearray] = []
    start = chunks[0].first
    for k in range(len(chunks) - 1):
        before, after = chunks[k], chunks[k + 1]
        splice = _splice_frame(before, after, (k + 1) * chunk_frames)
        frames = before.frames(start, splice)
        _write_payload_tail(frames, after.main_data_before(splice, after.reservoir(splice)))
        out.extend(frames)
        start = splice
    out.extend(chunks[-1].frames(start, chunks[-1].end))
    audio = b"".join(out)
    return info_frame(audio, num_samples) + audio


def _splice_frame(before: Frames, after: Frames, boundary: int) -> int:
    for delta in sorted(SPLICE_CANDIDATES, key=abs):
        frame = boundary + delta
        if not (after.first < frame < before.end and frame >= before.first):
            continue
        needed = after.reservoir(frame)
        if needed <= before.reservoir(frame):
            return frame
    raise SpliceError(f"no splice frame near frame {boundary} fits the bit reservoir")

