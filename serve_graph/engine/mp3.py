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


def encode_mp3(pcm16: np.ndarray, samplerate: int, bitrate: int = 192, quality: int = 2) -> bytes:
    """Encode interleaved int16 samples `[T, C]` at `samplerate` Hz as a gapless CBR MP3."""
    num_samples, channels = pcm16.shape
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate)
    encoder.set_in_sample_rate(samplerate)
    encoder.set_channels(channels)
    encoder.set_quality(quality)  # 2: highest, 7: fastest
    encoder.silence()
    audio = bytes(encoder.encode(np.ascontiguousarray(pcm16).tobytes()) + encoder.flush())
    return info_frame(audio, num_samples) + audio
