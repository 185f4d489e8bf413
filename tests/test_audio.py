"""Decoding files FFmpeg wrote in each format, and encoding stems (real encoders, real decoder)."""
import io
import math
import time
import wave
import zipfile

import numpy as np
import pytest
import torch as th

import soundfile

from audio_files import FORMATS, encode, tone
from bad_inputs import Sentinels, audio_file, playlists
from serve_graph.engine import (AudioTooLongError, InvalidAudioError, decode, probe,
                                zip_files)
from serve_graph.engine.audio import _Samples, select_stems
from serve_graph.engine.output import encode_stem
from serve_graph.engine.mp3 import count_frames, parse_header

MODEL_RATE = 44100
FRAME_SAMPLES = {"mp3": 1152, "m4a": 1024, "ogg": 2048, "opus": 960}  # per codec frame


def _cases():
    for fmt in FORMATS:
        for rate in (22050, 44100, 48000):
            if fmt == "opus" and rate != 48000:
                continue  # Opus codes at 48 kHz only
            for channels in (1, 2, 6):
                if fmt == "mp3" and channels > 2:
                    continue  # MP3 has at most two channels
                yield pytest.param(fmt, rate, channels, id=f"{fmt}-{rate}-{channels}ch")


@pytest.mark.parametrize("fmt,rate,channels", list(_cases()))
def test_decode_format(fmt, rate, channels):
    seconds = 2.0
    source = tone(seconds, rate, channels)
    wav = decode(encode(source, rate, fmt), MODEL_RATE, 2)
    assert wav.dtype == np.float32 and wav.shape[0] == 2
    frame = math.ceil(FRAME_SAMPLES.get(fmt, 1) * MODEL_RATE / rate)
    assert abs(wav.shape[1] - seconds * MODEL_RATE) <= frame
    if channels == 1:
        assert np.array_equal(wav[0], wav[1])
    peak = 2.0 if channels == 6 else 1.0  # a 5.1 downmix sums centre and surrounds
    assert 0.05 < np.abs(wav).max() < peak


def test_lossless_decode_keeps_the_samples():
    source = tone(1.0, MODEL_RATE, 2)
    wav = decode(encode(source, MODEL_RATE, "wavfloat"), MODEL_RATE, 2)
    assert np.array_equal(wav, source)


def test_resampling_keeps_a_tone_at_its_frequency():
    rate = 48000
    t = np.arange(rate) / rate
    source = np.stack([np.sin(2 * np.pi * 1000 * t)] * 2).astype(np.float32) * 0.5
    wav = decode(encode(source, rate, "wavfloat"), MODEL_RATE, 2)[0]
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    peak_hz = np.argmax(spectrum) * MODEL_RATE / len(wav)
    assert abs(peak_hz - 1000) < 2


@pytest.mark.parametrize("rate", [22050, 48000])
def test_resampling_agrees_with_demucs_fallback_resampler(rate):
    """FFmpeg's resampler (ours, and Demucs' CLI's first choice) against julius' windowed sinc
    (Demucs' fallback): the same signal below 10 kHz, to within -40 dB."""
    import julius
    t = np.arange(2 * rate) / rate
    source = sum(0.2 * np.sin(2 * np.pi * hz * t + hz) for hz in (110, 440, 2500, 9000))
    source = np.stack([source, source[::-1]]).astype(np.float32)
    ours = decode(encode(source, rate, "wavfloat"), MODEL_RATE, 2)
    reference = julius.resample_frac(th.from_numpy(source), rate, MODEL_RATE).numpy()
    assert ours.shape == reference.shape
    edge = MODEL_RATE // 100  # both filters start and end differently: skip 10 ms
    error = np.square(ours - reference)[:, edge:-edge].sum() / np.square(reference).sum()
    assert 10 * np.log10(error) < -40


@pytest.mark.parametrize("data", [b"", b"hello, this is a text file\n" * 50,
                                  bytes(range(256)) * 40], ids=["empty", "text", "binary"])
def test_non_audio_raises_typed_error(data):
    with pytest.raises(InvalidAudioError):
        decode(data)


@pytest.mark.parametrize("data", [b"", b"hello, this is a text file\n" * 50,
                                  bytes(range(256)) * 40, b"{}"],
                         ids=["empty", "text", "binary", "json"])
def test_probe_refuses_what_is_not_audio_from_its_headers(data):
    with pytest.raises(InvalidAudioError):
        probe(data)


def test_probe_passes_audio_and_refuses_a_stated_length_over_the_limit():
    flac = audio_file("flac", 3.0)
    assert probe(flac) == pytest.approx(3.0, abs=0.05)
    assert probe(flac[:len(flac) // 2], max_seconds=10) is not None  # decoding shows the cut
    with pytest.raises(AudioTooLongError):
        probe(flac, max_seconds=1)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncated_or_corrupt_file_raises_typed_error(fmt):
    data = audio_file(fmt, 2.0)
    assert decode(data).shape[0] == 2
    for cut in (len(data) // 2, int(len(data) * 0.9), 200):
        with pytest.raises(InvalidAudioError):
            decode(data[:cut])


def test_eight_channels_are_downmixed():
    """7.1 audio is separated from its stereo downmix (FFmpeg's layout rules)."""
    buf = io.BytesIO()
    soundfile.write(buf, np.tile(tone(1.0, MODEL_RATE, 2).T * 0.3, (1, 4)), MODEL_RATE,
                    format="WAV", subtype="PCM_16")
    wav = decode(buf.getvalue())
    assert wav.shape == (2, MODEL_RATE) and 0.01 < np.abs(wav).max() < 1


@pytest.mark.parametrize("name", list(playlists("/x", 1)))
def test_playlists_are_refused_before_ffmpeg_opens_them(name, tmp_path):
    """Playlist and session demuxers are not on the list FFmpeg may probe; the sentinels
    would see FFmpeg open the file or the socket they name (their own check below)."""
    opened = Sentinels(tmp_path / "sentinel.wav")
    try:
        with pytest.raises(InvalidAudioError, match="container this service reads"):
            decode(playlists(str(opened.fifo), opened.port)[name].encode())
    finally:
        assert opened.close() == []


def test_sentinels_see_a_file_opened_and_a_connection(tmp_path):
    import os
    import socket
    import time
    opened = Sentinels(tmp_path / "sentinel.wav")
    socket.create_connection(("127.0.0.1", opened.port)).close()
    reader = os.open(opened.fifo, os.O_RDONLY | os.O_NONBLOCK)
    time.sleep(0.3)
    os.close(reader)
    assert len(opened.close()) == 2


def test_zero_length_audio_raises_typed_error():
    with pytest.raises(InvalidAudioError):
        decode(encode(np.zeros((2, 0), np.float32), MODEL_RATE, "wav16"))


def test_too_long_audio_raises_before_separation():
    data = encode(tone(3.0, MODEL_RATE, 2), MODEL_RATE, "flac")
    with pytest.raises(AudioTooLongError):
        decode(data, max_seconds=1.0)
    assert decode(data, max_seconds=5.0).shape[1] == 3 * MODEL_RATE


@pytest.mark.parametrize("bitrate", [128, 192, 320])
def test_mp3_stems_are_gapless(bitrate):
    """The LAME Info tag makes the decoded stem exactly as long as the stem, aligned."""
    stem = tone(1.5, MODEL_RATE, 2, seed=3)
    stem[:, 30000] = 0.9
    data = encode_stem(stem, MODEL_RATE, "mp3", bitrate)
    decoded = decode(data, MODEL_RATE, 2)
    assert decoded.shape == stem.shape
    assert int(np.abs(decoded[0]).argmax()) == 30000
    info = parse_header(data)
    assert data[36:40] == b"Info"
    assert parse_header(data, info.size).bitrate_kbps == bitrate
    assert (count_frames(data) - 1) * 1152 >= stem.shape[1]


@pytest.mark.parametrize("depth,tolerance", [("int16", 2 / 2**15), ("int24", 2 / 2**23),
                                             ("float32", 0)])
def test_wav_depths_round_trip(depth, tolerance):
    stem = tone(0.5, MODEL_RATE, 2)
    data = encode_stem(stem, MODEL_RATE, "wav", wav_depth=depth)
    if depth != "float32":
        with wave.open(io.BytesIO(data)) as reader:
            assert reader.getsampwidth() == {"int16": 2, "int24": 3}[depth]
            assert reader.getframerate() == MODEL_RATE and reader.getnchannels() == 2
    decoded = decode(data, MODEL_RATE, 2)
    assert np.allclose(decoded, stem, atol=tolerance, rtol=0)


def test_flac_round_trip_is_16_bit_exact():
    stem = tone(0.5, MODEL_RATE, 2)
    decoded = decode(encode_stem(stem, MODEL_RATE, "flac"), MODEL_RATE, 2)
    assert np.allclose(decoded, stem, atol=2 / 2**15, rtol=0)


def test_loud_stems_are_rescaled_not_clipped():
    stem = tone(0.5, MODEL_RATE, 2) * 4
    decoded = decode(encode_stem(stem, MODEL_RATE, "wav", wav_depth="float32"), MODEL_RATE, 2)
    assert np.abs(decoded).max() < 1.0
    assert np.allclose(decoded * 1.01 * np.abs(stem).max(), stem, atol=1e-5)


def test_two_stems_sums_the_others_and_zip_names():
    stems = {name: np.full((2, 10), float(i + 1), np.float32)
             for i, name in enumerate(["drums", "bass", "other", "vocals"])}
    selected = select_stems(stems, "vocals")
    assert list(selected) == ["vocals", "no_vocals"]
    assert np.array_equal(selected["no_vocals"], np.full((2, 10), 6., np.float32))
    archive = zipfile.ZipFile(io.BytesIO(zip_files({"vocals.mp3": b"a", "no_vocals.mp3": b"b"})))
    assert archive.namelist() == ["vocals.mp3", "no_vocals.mp3"]


@pytest.mark.parametrize("zip64_limit", [None, 10], ids=["one-join", "zipfile"])
def test_zip_files_reads_back_with_zipfile(monkeypatch, zip64_limit):
    """The ZIP written in one join (or by zipfile, past its limit) is one zipfile reads and
    checks: names in order (a UTF-8 one too), contents and CRCs, mode 0644, today's date."""
    from serve_graph.engine import audio
    if zip64_limit is not None:
        monkeypatch.setattr(audio, "ZIP64_LIMIT", zip64_limit)
    files = {"vocals.mp3": np.random.default_rng(0).bytes(300_000), "no_vocals.mp3": b"",
             "stimme_\u00fc.wav": b"RIFF" * 10}
    archive = zipfile.ZipFile(io.BytesIO(zip_files(files)))
    assert archive.testzip() is None
    assert archive.namelist() == list(files)
    assert all(archive.read(name) == data for name, data in files.items())
    assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    if zip64_limit is None:
        assert all(info.external_attr >> 16 == 0o644 for info in archive.infolist())
    assert archive.infolist()[0].date_time[:3] == time.localtime()[:3]


def test_spill_writes_every_byte_even_when_os_pwrite_writes_fewer(tmp_path, monkeypatch):
    """`os.pwrite` may write fewer bytes than given: `_write_all` carries on until the whole
    stretch is in the spill file, where it belongs (one short of bytes would re-encode
    garbage when a stem must be rescaled)."""
    import os
    from serve_graph.engine import output
    real_pwrite = os.pwrite
    monkeypatch.setattr(output.os, "pwrite",
                        lambda fd, data, offset: real_pwrite(fd, data[:1000], offset))
    audio = np.random.default_rng(0).standard_normal((2, 3000)).astype(np.float32)
    fd = os.open(tmp_path / "spill.f32", os.O_WRONLY | os.O_CREAT)
    output._write_all(fd, audio[1], 12)
    output._write_all(fd, audio[0], 12 + audio[1].nbytes)
    os.close(fd)
    assert (tmp_path / "spill.f32").read_bytes() == bytes(12) + audio[::-1].tobytes()


@pytest.mark.parametrize("expected", [1, 7, 12, 40])
def test_decoded_samples_equal_the_frames_joined_whatever_length_was_expected(expected):
    """Frames go into one array sized for the length the header states: fewer or more frames
    than that (a header that estimates or lies) still give exactly the frames, contiguous."""
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((2, k)).astype(np.float32) for k in (3, 4, 5)]
    samples = _Samples(expected)
    for frame in frames:
        samples.append(frame)
    joined = samples.array()
    assert joined.flags.c_contiguous
    np.testing.assert_array_equal(joined, np.concatenate(frames, axis=1))
