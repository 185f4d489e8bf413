"""Audio in: decode any format FFmpeg reads; stems chosen for output; ZIP. (Encoding: output.py.)

Audio is float32 arrays `[C, T]`, C channels by T samples, nominal range [-1, 1].
"""
import io
import struct
import time
import typing as tp
import zipfile
import zlib

import av
import numpy as np

from .errors import AudioTooLongError, InvalidAudioError, InvalidParameterError

if tp.TYPE_CHECKING:
    from .split_decode import SplitDecoder

SAMPLE_RATES = (4000, 768000)  # Hz: the rates accepted; outside them a header is corrupt or hostile
MIN_SECONDS = 0.1  # shorter audio cannot be separated meaningfully
MAX_SAMPLE = 1e3  # |sample| above this (60 dB over full scale) is corrupt float audio
# The containers read (FFmpeg demuxer names). Only these are probed: playlists and session
# descriptions (hls, concat, sdp, rtsp...) would make FFmpeg open other files or sockets.
DEMUXERS = ("wav", "w64", "aiff", "caf", "flac", "mp3", "ogg", "mov", "mp4", "m4a", "matroska",
            "webm", "aac", "ac3", "eac3", "dts", "truehd", "mlp", "wv", "ape", "tta", "tak",
            "mpc", "mpc8", "dsf", "asf", "au", "amr", "voc", "xwma", "avi", "flv", "mpegts",
            "mpeg", "rm")
TRUNCATION_TOLERANCE_S = 0.1  # decoded may fall short of a header's exact length by this


def decode(data: bytes, samplerate: int = 44100, channels: int = 2,
           max_seconds: tp.Optional[float] = None,
           split: tp.Optional["SplitDecoder"] = None) -> np.ndarray:
    """Decode `data` (any container/codec FFmpeg reads) to a float32 array `[channels, T]` at
    `samplerate` Hz. Mono is duplicated; more than two channels are downmixed by FFmpeg's
    channel-layout rules; other rates are resampled by FFmpeg's resampler while decoding, as
    Demucs' own CLI does (`AudioFile.read(samplerate=...)`; julius is only its fallback):
    0.52 s instead of julius' 0.69 s for a 290 s 22.05 kHz MP3 (benchmarks/RESULTS.md).

    With `split`, an MP3 that needs no conversion is decoded in parts at once, by this thread
    and the `SplitDecoder`'s helper processes, to the same samples (a 216 s song on two cores,
    one helper: 0.245 -> 0.19 s; benchmarks/RESULTS.md).

    Raises `InvalidAudioError` for empty, corrupt, truncated or non-audio bytes, for rates
    outside `SAMPLE_RATES`, for NaN, infinite or absurd (beyond `MAX_SAMPLE`) samples and for
    audio shorter than `MIN_SECONDS`; `AudioTooLongError` past `max_seconds` (checked before
    and while decoding).
    """
    if not data:
        raise InvalidAudioError("the file is empty")
    wav = _decode_at(data, samplerate, max_seconds, split)
    if wav.shape[0] != channels:
        wav = wav.mean(0, keepdims=True) if channels == 1 else np.repeat(wav[:1], channels, 0)
    return np.ascontiguousarray(wav)


def peak(audio: np.ndarray) -> float:
    """The largest |sample| of `audio` (0 when empty; NaN if any sample is), read without
    a temporary array."""
    return max(float(audio.max(initial=0.)), -float(audio.min(initial=0.)))


def _check_samples(wav: np.ndarray, rate: int) -> None:
    """Refuse what no separation can come from: non-finite or absurd samples, near-empty audio."""
    if wav.shape[1] < MIN_SECONDS * rate:
        raise InvalidAudioError(f"the audio lasts {wav.shape[1] / rate:.3f} s; at least "
                                f"{MIN_SECONDS} s is needed")
    largest = peak(wav)
    if not np.isfinite(largest):
        raise InvalidAudioError("the audio holds NaN or infinite samples (corrupt float audio)")
    if largest > MAX_SAMPLE:
        raise InvalidAudioError(f"the audio's samples reach {largest:.3g}, far outside [-1, 1] "
                                f"(corrupt float audio)")


def probe(data: bytes, max_seconds: tp.Optional[float] = None) -> tp.Optional[float]:
    """What `decode` can tell of `data` from its headers alone, reading no audio frames (a
    few milliseconds): `InvalidAudioError` when it is empty, not in a container this service
    reads, or holds no audio stream at a sane rate; `AudioTooLongError` when its header states
    more than `max_seconds`. Returns the seconds the header states (None: not stated)."""
    if not data:
        raise InvalidAudioError("the file is empty")
    with _open(data) as container:
        return _audio_stream(container, data, max_seconds)[1]


def _open(data: bytes):
    """`data` opened by PyAV, only with the demuxers of `DEMUXERS`."""
    try:
        return av.open(io.BytesIO(data), mode="r",
                       options={"format_whitelist": ",".join(DEMUXERS)})
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidAudioError(f"not an audio file in a container this service reads "
                                f"({exc}); supported: {', '.join(DEMUXERS)}") from None


def _decode_at(data: bytes, samplerate: int, max_seconds: tp.Optional[float],
               split: tp.Optional["SplitDecoder"]) -> np.ndarray:
    """The first audio stream, `[1 or 2, T]` float32 at `samplerate`, its samples checked."""
    container = _open(data)
    with container:
        format_name = container.format.name
        stream, declared = _audio_stream(container, data, max_seconds)
        limit = _sample_limit(max_seconds, samplerate)
        expected = _expected_samples(stream, samplerate, limit)
        wav = None
        if split is not None and format_name == "mp3":
            wav = split.decode(data, stream, samplerate, expected, declared is not None, limit)
        if wav is None:
            wav = _decode_frames(container, stream, samplerate, expected, max_seconds)
    if format_name == "wav":
        _check_wav_data_size(data)
    if format_name == "ogg":
        _check_ogg_end(data)
    seconds = wav.shape[1] / samplerate
    if declared is not None and seconds < declared - TRUNCATION_TOLERANCE_S:
        raise InvalidAudioError(f"truncated audio: {seconds:.2f} s decoded of the "
                                f"{declared:.2f} s the file declares")
    _check_samples(wav, samplerate)
    return wav


def _audio_stream(container, data: bytes,
                  max_seconds: tp.Optional[float]) -> tp.Tuple[tp.Any, tp.Optional[float]]:
    """The first audio stream and the seconds its header states (None: not stated), refused
    without a sane sample rate or when it states more than `max_seconds`."""
    if not container.streams.audio:
        raise InvalidAudioError("the file has no audio stream")
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate or stream.rate
    if not rate:
        raise InvalidAudioError("the audio stream has no sample rate")
    low, high = SAMPLE_RATES
    if not low <= rate <= high:
        raise InvalidAudioError(f"the file declares a sample rate of {rate} Hz; "
                                f"{low} Hz to {high} Hz are supported")
    declared = _declared_seconds(container, stream, data)
    if max_seconds is not None and declared is not None and declared > max_seconds + 1:
        raise AudioTooLongError(f"the audio lasts {declared:.1f} s, longer than the "
                                f"limit of {max_seconds:.0f} s")
    return stream, declared


def _sample_limit(max_seconds: tp.Optional[float], samplerate: int) -> tp.Optional[int]:
    """Samples per channel beyond which audio is longer than `max_seconds`."""
    return None if max_seconds is None else int(max_seconds * samplerate) + 1


def _decode_frames(container, stream, samplerate: int, expected: int,
                   max_seconds: tp.Optional[float]) -> np.ndarray:
    """`stream` decoded in one pass, `[1 or 2, T]` float32 at `samplerate` (FFmpeg's resampler
    converting rate and layout where needed), into an array of `expected` samples."""
    layout = "stereo" if stream.codec_context.channels > 2 else None
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=samplerate)
    limit = _sample_limit(max_seconds, samplerate)
    samples = _Samples(expected)
    try:
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                samples.append(out.to_ndarray())
            if limit is not None and samples.length > limit:
                raise AudioTooLongError(f"the audio is longer than the limit of "
                                        f"{max_seconds:.0f} s")
        for out in resampler.resample(None):
            samples.append(out.to_ndarray())
    except av.FFmpegError as exc:
        raise InvalidAudioError(f"corrupt or truncated audio after "
                                f"{samples.length / samplerate:.2f} s: {exc}") from None
    if not samples.length:
        raise InvalidAudioError("no audio could be decoded from the file (empty or corrupt)")
    return samples.array()


def _expected_samples(stream, samplerate: int, limit: tp.Optional[int]) -> int:
    """The samples per channel the stream should decode to at `samplerate` (its header's or
    FFmpeg's estimate), at most `limit` (or an hour when there is none: a header may lie)."""
    expected = 1 << 20
    if stream.duration is not None and stream.time_base is not None:
        expected = int(round(float(stream.duration * stream.time_base) * samplerate))
    return max(1, min(expected, limit or 3600 * samplerate))


class _Samples:
    """Decoded audio `[C, n]` float32, written frame by frame into one array allocated for the
    length expected (its pages are touched only as frames fill them, so a lying header costs
    nothing). Instead of a small array per frame joined at the end, which held the song twice:
    decoding a 216 s MP3 peaks at 78 MB instead of 151 MB (benchmarks/RESULTS.md)."""

    def __init__(self, expected: int):
        self._expected = expected
        self._array: tp.Optional[np.ndarray] = None
        self.length = 0

    def append(self, block: np.ndarray) -> None:
        """The next frames, `[C, k]`."""
        end = self.length + block.shape[1]
        if self._array is None:
            self._array = np.empty((block.shape[0], max(self._expected, end)), np.float32)
        elif end > self._array.shape[1]:  # longer than expected: grow by half
            grown = np.empty((block.shape[0], max(end, self._array.shape[1] * 3 // 2)),
                             np.float32)
            grown[:, :self.length] = self._array[:, :self.length]
            self._array = grown
        self._array[:, self.length:end] = block
        self.length = end

    def array(self) -> np.ndarray:
        """All samples, `[C, n]` C-contiguous (copied only when fewer came than expected)."""
        assert self._array is not None
        return np.ascontiguousarray(self._array[:, :self.length])


def _check_wav_data_size(data: bytes) -> None:
    """A WAV's data chunk must hold the bytes its header declares (FFmpeg quietly plays what is
    there): more declared than present is a truncated file or a lying header. 0 and 0xFFFFFFFF
    mark a stream of unknown length and pass."""
    at = data.find(b"data", 12, 1 << 16)
    if at < 0 or at + 8 > len(data):
        return
    declared = struct.unpack("<I", data[at + 4:at + 8])[0]
    present = len(data) - at - 8
    if declared not in (0, 0xFFFFFFFF) and declared > present + 1024:
        raise InvalidAudioError(f"truncated WAV: its header declares {declared} bytes of audio, "
                                f"the file holds {present}")


def _check_ogg_end(data: bytes) -> None:
    """An Ogg file is a chain of whole pages, the last flagged end-of-stream; FFmpeg quietly
    plays a file cut short, whose last page is partial or not flagged."""
    at, flags = 0, 0
    while at < len(data):
        segments_end = at + 27 + (data[at + 26] if at + 27 <= len(data) else 0)
        page_end = segments_end + sum(data[at + 27:segments_end])
        if data[at:at + 4] != b"OggS" or segments_end > len(data) or page_end > len(data):
            raise InvalidAudioError(f"truncated Ogg: the page at byte {at} is cut short")
        at, flags = page_end, data[at + 5]
    if not flags & 0x04:
        raise InvalidAudioError("truncated Ogg: the stream stops before its end-of-stream page")


# Containers whose headers state the exact length; FFmpeg only estimates others from bitrates.
_EXACT_LENGTH_FORMATS = {"wav", "w64", "aiff", "flac", "caf", "mov,mp4,m4a,3gp,3g2,mj2"}


def _declared_seconds(container, stream, data: bytes) -> tp.Optional[float]:
    """The duration the file's header states, None where FFmpeg only estimates it (an MP3
    without a Xing/Info header, streams)."""
    if stream.duration is None or stream.time_base is None:
        return None
    exact = (container.format.name in _EXACT_LENGTH_FORMATS or
             (container.format.name == "mp3" and (b"Xing" in data[:1 << 20] or
                                                 b"Info" in data[:1 << 20])))
    return float(stream.duration * stream.time_base) if exact else None


def output_names(sources: tp.Sequence[str], two_stems: tp.Optional[str] = None,
                 subset: tp.Optional[tp.Sequence[str]] = None,
                 remix: tp.Optional[tp.Mapping[str, float]] = None,
                 master: bool = False) -> tp.List[str]:
    """The stems returned, in `select_stems`' order: `[X, no_X]` for `two_stems=X`, the
    `subset`'s in the model's order, `["remix"]` for a `remix`, or every source (after
    "master", their sum, with `master`)."""
    if remix is not None:
        return ["remix"]
    if master:
        return ["master", *sources]
    if two_stems is not None:
        return [two_stems, f"no_{two_stems}"]
    return [name for name in sources if subset is None or name in subset]


def select_stems(stems: tp.Dict[str, np.ndarray], two_stems: tp.Optional[str] = None,
                 subset: tp.Optional[tp.Sequence[str]] = None,
                 remix: tp.Optional[tp.Mapping[str, float]] = None,
                 master: bool = False) -> tp.Dict[str, np.ndarray]:
    """The stems asked for: all (after their sum as "master", with `master`), the `subset`,
    `{X: stems[X], no_X: sum of the others}` for `two_stems=X`, summed in source order as the
    Demucs CLI does, or `{"remix": ...}` (`mix_stems`)."""
    if remix is not None:
        return {"remix": mix_stems(stems, remix)}
    if master:
        return {"master": mix_stems(stems, {}), **stems}
    if two_stems is None:
        return {name: stems[name] for name in output_names(list(stems), None, subset)}
    if two_stems not in stems:
        raise InvalidParameterError(f"two_stems must be one of {sorted(stems)}, "
                                    f"got {two_stems!r}")
    others = [wav for name, wav in stems.items() if name != two_stems]
    rest = np.zeros_like(others[0])
    for wav in others:
        rest += wav
    return {two_stems: stems[two_stems], f"no_{two_stems}": rest}


def mix_stems(stems: tp.Dict[str, np.ndarray], gains_db: tp.Mapping[str, float]
              ) -> np.ndarray:
    """The sum of `stems` (each `[C, T]`, in source order) at `gains_db` (a stem not named:
    0 dB, the stem itself; -inf: left out, so leaving out all is silence). The stems are not
    changed."""
    mixed = np.zeros_like(next(iter(stems.values())))
    for name, wav in stems.items():
        gain = gains_db.get(name, 0.)
        if gain != float("-inf"):
            mixed += wav if gain == 0 else wav * np.float32(10 ** (gain / 20))
    return mixed


def zip_files(files: tp.Dict[str, bytes]) -> bytes:
    """A ZIP archive of `{name: bytes}`, stored (the stems are compressed already or PCM).
    Written as one join of the headers and the files (zipfile's buffer grows and copies as it
    goes: 14-21 ms instead of ~7 for 20 MB of MP3 stems); zipfile writes it where it needs
    ZIP64 (4 GiB)."""
    if sum(len(data) for data in files.values()) >= ZIP64_LIMIT:
        return _zip_with_zipfile(files)
    day, clock = _dos_date_time(time.localtime())
    parts, directory, offset = [], [], 0
    for name, data in files.items():
        encoded = name.encode()
        flags = 0 if encoded.isascii() else 0x800  # UTF-8 names
        fields = struct.pack("<HHHHHIII", 20, flags, 0, clock, day, zlib.crc32(data),
                             len(data), len(data))
        parts += [b"PK\x03\x04" + fields + struct.pack("<HH", len(encoded), 0), encoded, data]
        directory.append(b"PK\x01\x02" + struct.pack("<H", UNIX_ZIP_20) + fields +
                         struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0o644 << 16, offset)
                         + encoded)
        offset += 30 + len(encoded) + len(data)
    size = sum(map(len, directory))
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(files), len(files), size, offset, 0)
    return b"".join(parts + directory + [end])


ZIP64_LIMIT = 0xFFFFFFFF - (1 << 20)  # bytes: beyond, offsets need ZIP64
UNIX_ZIP_20 = 3 << 8 | 20  # "made by" Unix (so the 0644 mode counts), ZIP 2.0


def _dos_date_time(now: time.struct_time) -> tp.Tuple[int, int]:
    """A ZIP entry's (date, time) fields, as zipfile writes them."""
    return ((now.tm_year - 1980) << 9 | now.tm_mon << 5 | now.tm_mday,
            now.tm_hour << 11 | now.tm_min << 5 | now.tm_sec // 2)


def _zip_with_zipfile(files: tp.Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()
