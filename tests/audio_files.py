"""Audio files for tests, written by real encoders in many formats: FFmpeg's (PyAV), and
libsndfile's (soundfile) for Ogg Vorbis, which PyAV's FFmpeg only encodes in stereo."""
import io
import typing as tp

import av
import numpy as np
import soundfile

# name: (container format, codec, sample format, file suffix)
FORMATS: tp.Dict[str, tp.Tuple[str, str, str, str]] = {
    "mp3": ("mp3", "libmp3lame", "s16p", "mp3"),
    "wav16": ("wav", "pcm_s16le", "s16", "wav"),
    "wav24": ("wav", "pcm_s24le", "s32", "wav"),
    "wav32": ("wav", "pcm_s32le", "s32", "wav"),
    "wavfloat": ("wav", "pcm_f32le", "flt", "wav"),
    "flac": ("flac", "flac", "s16", "flac"),
    "ogg": ("ogg", "libsndfile vorbis", "flt", "ogg"),
    "opus": ("ogg", "libopus", "flt", "opus"),
    "m4a": ("ipod", "aac", "fltp", "m4a"),
}


def tone(seconds: float, samplerate: int = 44100, channels: int = 2,
         seed: int = 0) -> np.ndarray:
    """A test signal `[channels, T]` float32: a chord plus a little noise, peak < 0.8."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * samplerate)) / samplerate
    base = sum(np.sin(2 * np.pi * f * t) for f in (220., 330., 440., 1250.)) * 0.15
    wav = np.stack([base * (1 - 0.1 * c) for c in range(channels)])
    wav += 0.02 * rng.standard_normal(wav.shape)
    return wav.astype(np.float32)


def encode(wav: np.ndarray, samplerate: int, fmt: str,
           bitrate: tp.Optional[int] = None) -> bytes:
    """Encode `[C, T]` float32 audio into `fmt` (a key of FORMATS) with FFmpeg (at `bitrate`
    bits per second where given)."""
    container_format, codec, sample_format, _ = FORMATS[fmt]
    if codec.startswith("libsndfile"):
        buf = io.BytesIO()
        soundfile.write(buf, wav.T, samplerate, format="OGG", subtype="VORBIS")
        return buf.getvalue()
    channels = wav.shape[0]
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=samplerate, layout=layout)
        stream.format = sample_format
        if bitrate is not None:
            stream.bit_rate = bitrate
        for packet in _encode_frames(stream, wav, samplerate, layout, sample_format):
            container.mux(packet)
    return buf.getvalue()


def _encode_frames(stream, wav, samplerate, layout, sample_format):
    planar = sample_format.endswith("p")
    if sample_format.startswith("s16"):
        data = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
    elif sample_format.startswith("s32"):
        data = (np.clip(wav.astype(np.float64), -1, 1) * (2**31 - 1)).astype(np.int32)
    else:
        data = wav.astype(np.float32)
    block = 4096
    for start in range(0, data.shape[1], block):
        chunk = data[:, start:start + block]
        array = chunk if planar else chunk.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=sample_format,
                                           layout=layout)
        frame.sample_rate = samplerate
        frame.pts = start
        yield from stream.encode(frame)
    yield from stream.encode(None)


def decoded(data: bytes, *args, **kwargs):
    """`engine.decode`'s samples `[C, T]` (a float32 array) as a torch tensor, to compare
    with the engine's stems (`separate` gives tensors)."""
    import torch as th

    from serve_graph.engine import decode
    return th.from_numpy(decode(data, *args, **kwargs))
