"""Stems finished and encoded while the song is separated: progressive overlap-add, MP3 chunks
encoded in parallel and spliced gaplessly, clip prevention that needs the whole stem."""
import io
import os
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
import torch as th

from serve_graph.engine import ModelRunner, SeparationOptions, model_geometry, separate
from serve_graph.engine import mp3, output
from serve_graph.engine.audio import mix_stems
from serve_graph.engine.output import StemFile, encode_stem, prevent_clip
from serve_graph.engine.pipeline import separate_to_zip
from serve_graph.engine.plan import in_order, plan_windows
from serve_graph.engine.overlap_add import BLOCK, OverlapAdd
from serve_graph.engine.windows import center_trim, window_input
from audio_files import decoded, encode, tone

RATE = 44100


def sweep(seconds: float, low: float = 40., high: float = 16000.) -> np.ndarray:
    """An exponential sine sweep `[2, T]` float32 (right channel 0.7 x left, 3 ms later)."""
    t = np.arange(int(seconds * RATE)) / RATE
    k = np.log(high / low)
    left = 0.5 * np.sin(2 * np.pi * low * seconds / k * (np.exp(t / seconds * k) - 1))
    return np.stack([left, 0.7 * np.roll(left, 132)]).astype(np.float32)


def write_in_stretches(stem: StemFile, audio: np.ndarray, seed: int = 0) -> bytes:
    """Feed `[C, T]` audio to `stem` in stretches of random length, then finish."""
    rng = np.random.default_rng(seed)
    position = 0
    while position < audio.shape[1]:
        step = int(rng.integers(1, 200_000))
        stem.write(audio[:, position:position + step])
        position += step
    return stem.finish()


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize("signal,quality", [("sweep", 2), ("sweep+noise", 2),
                                            ("sweep+noise", 7)])
def test_mp3_chunks_splice_inaudibly(tmp_path, signal, quality):
    """Around every splice the chunked encode differs from a one-shot encode by no more than
    the one-shot encode differs from the input; lengths and alignment are exact; at LAME's
    quality 2 (Demucs') and 7 (its fastest search)."""
    audio = sweep(40.)
    if signal == "sweep+noise":
        audio = 0.5 * audio + 0.1 * np.random.default_rng(1).standard_normal(audio.shape,
                                                                              np.float32)
    samples = audio.shape[1]
    bounds = mp3.chunk_bounds(samples)
    assert len(bounds) >= 5
    with ThreadPoolExecutor(2) as pool:
        stem = StemFile("mp3", samples, 2, RATE, pool, str(tmp_path), quality=quality)
        chunked = write_in_stretches(stem, audio)
        stem.close()
    one_shot = encode_stem(th.from_numpy(audio), RATE, "mp3", quality=quality)
    chunked_wav, one_wav = decoded(chunked).numpy(), decoded(one_shot).numpy()
    assert chunked_wav.shape == one_wav.shape == audio.shape
    assert mp3.count_frames(chunked) == mp3.count_frames(one_shot)
    for k in range(1, len(bounds)):
        splice = k * mp3.CHUNK_FRAMES * 1152
        around = slice(splice - 4 * 1152, splice + 4 * 1152)
        codec_error = rms(one_wav[:, around] - audio[:, around])
        assert rms(chunked_wav[:, around] - one_wav[:, around]) <= codec_error, k
    assert rms(chunked_wav - audio) <= 1.05 * rms(one_wav - audio)
    assert not os.listdir(tmp_path)  # the spill file is gone
    if quality != 2:  # the setting reaches LAME: another encoder search, other bytes
        excerpt = th.from_numpy(audio[:, :3 * RATE])
        assert encode_stem(excerpt, RATE, "mp3", quality=quality) != encode_stem(excerpt, RATE)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "m4a", "opus"])
def test_loud_stem_written_in_stretches_is_rescaled_like_a_whole_one(tmp_path, fmt):
    """The peak comes late: the stretches encoded before it are redone with the scale."""
    audio = tone(14., RATE, 2) * 0.5
    audio[:, -RATE:] *= 5  # peaks at ~2 in the last second
    whole = th.from_numpy(audio)
    with ThreadPoolExecutor(2) as pool:
        stem = StemFile(fmt, audio.shape[1], 2, RATE, pool, str(tmp_path), wav_depth="int16")
        data = write_in_stretches(stem, audio)
        assert stem.scale < 1
        stem.close()
    written = decoded(data)
    expected = prevent_clip(whole)
    if fmt in ("mp3", "m4a", "opus"):
        length = min(written.shape[-1], expected.shape[-1])
        assert abs(written.shape[-1] - expected.shape[-1]) <= 2048
        assert rms((written[:, :length] - expected[:, :length]).numpy()) < 0.01
    else:
        assert th.allclose(written, expected, atol=2 / 2**15, rtol=0)
    if fmt != "mp3":  # streamed: the very bytes of the one-shot encode
        assert data == encode_stem(whole, RATE, fmt)


def test_mp3_chunks_clamp_and_spill_their_own_samples(tmp_path):
    """Each chunk task clamps its samples, spills the ones it owns and notes their peak:
    the spill file holds the clamped stem, planar, and the MP3 is the one-shot encode of the
    clamped stem's."""
    audio = sweep(30.) * 3  # reaches 1.5
    with ThreadPoolExecutor(2) as pool:
        stem = StemFile("mp3", audio.shape[1], 2, RATE, pool, str(tmp_path), clip="clamp")
        data = write_in_stretches(stem, audio)
        clamped = np.clip(audio, -1, 1)
        assert np.array_equal(np.asarray(stem._spilled()), clamped)
        assert stem.peak == 1. and stem.scale == 1.
        stem.close()
    one_shot = decoded(encode_stem(th.from_numpy(clamped), RATE, "mp3")).numpy()
    assert rms(decoded(data).numpy() - one_shot) <= 0.05 * rms(clamped)


def test_closing_a_stem_while_its_chunks_encode_stops_their_spill_writes(tmp_path,
                                                                        monkeypatch):
    """A song cancelled mid-way closes its stems while chunk tasks still run: the spill file
    goes at once, and the tasks that go on later end cleanly without writing (no write lands
    on a descriptor number reused since)."""
    started, release = threading.Event(), threading.Event()
    samples = output._samples

    def held(*args):  # a chunk task, held before it spills
        started.set()
        release.wait(10)
        return samples(*args)
    monkeypatch.setattr(output, "_samples", held)
    audio = sweep(40.)
    with ThreadPoolExecutor(2) as pool:
        stem = StemFile("mp3", audio.shape[1], 2, RATE, pool, str(tmp_path), max_pending=8)
        stem.write(audio[:, :audio.shape[1] // 2])
        assert started.wait(10)
        spill = stem.spill_path
        stem.close()
        assert not os.path.exists(spill)
        other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # may reuse the number
        release.set()
    assert not os.path.exists(spill) and os.fstat(other).st_size == 0
    assert all(chunk.cancelled() or chunk.exception() is None for chunk in stem._chunks)
    os.close(other)


def test_overlap_add_hands_out_final_stretches_and_holds_few_blocks(tiny_model):
    """Windows added in order of position: stems come out long before the last window, match
    the all-at-once result, and only a few blocks per pass are held at any time."""
    geometry = model_geometry(tiny_model)
    mix = th.randn(2, 40 * BLOCK)
    plan = plan_windows(mix.shape[-1], geometry, shifts=3, overlap=0.25, seed=5)
    acc, whole = OverlapAdd(plan, geometry), OverlapAdd(plan, geometry)
    stretches, most_blocks, first_out = [], 0, None
    for count, window in enumerate(in_order(plan), 1):
        piece = center_trim(window_input(mix, window), window.length)
        output = th.stack([piece * (k + 1) for k in range(4)])
        acc.add(window, output)
        whole.add(window, output)
        stretch = acc.take(BLOCK)
        if stretch is not None:
            stretches.append(stretch)
            first_out = first_out or count
        most_blocks = max(most_blocks, sum(len(b) for b in acc._blocks))
    assert first_out is not None and first_out <= 3 * len(plan.passes)
    blocks_per_segment = plan.passes[0].segment_length // BLOCK + 2
    assert most_blocks <= len(plan.passes) * 2 * blocks_per_segment
    streamed = np.concatenate(stretches, -1)
    assert np.array_equal(streamed, whole.result())  # freed blocks are reused: zeroed again
    expected = mix[None] * th.arange(1., 5.)[:, None, None]
    assert np.allclose(streamed, expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("fmt,two_stems", [("wav", None), ("flac", "vocals")])
def test_recipe_zip_matches_stems_separated_at_once(tiny_model, fmt, two_stems):
    """`separate_to_zip` (stems encoded while the windows run) returns what encoding the
    stems of `separate` (everything at once) returns, byte for byte for lossless formats."""
    wav = tone(20., RATE, 2)
    data = encode(wav, RATE, "wavfloat")
    options = SeparationOptions(two_stems=two_stems, shifts=2, format=fmt)
    runner = ModelRunner(tiny_model, "cpu")
    archive = zipfile.ZipFile(io.BytesIO(separate_to_zip(data, runner, options)))
    stems = dict(zip(runner.geometry.sources, separate(runner, decoded(data), shifts=2)))
    if two_stems:
        stems = {two_stems: stems[two_stems],
                 f"no_{two_stems}": sum(s for n, s in stems.items() if n != two_stems)}
    assert archive.namelist() == [f"{name}.{fmt}" for name in stems]
    for name, stem in stems.items():
        assert archive.read(f"{name}.{fmt}") == encode_stem(stem, RATE, fmt), name


@pytest.mark.parametrize("max_pending", [2, 6])
def test_one_stem_keeps_max_pending_chunks_encoding(tmp_path, monkeypatch, max_pending):
    """A whole song's audio arriving at once (a GPU's pace) keeps `max_pending` chunks of one
    stem encoding side by side, so one song can use every encoding thread."""
    running, most, lock = [0], [0], threading.Lock()
    encode_chunk = mp3.encode_chunk

    def slow_chunk(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return encode_chunk(*args)
        finally:
            with lock:
                running[0] -= 1
    monkeypatch.setattr(mp3, "encode_chunk", slow_chunk)
    audio = sweep(60.)
    with ThreadPoolExecutor(8) as pool:
        stem = StemFile("mp3", audio.shape[1], 2, RATE, pool, str(tmp_path),
                        max_pending=max_pending)
        stem.write(audio)
        assert decoded(stem.finish()).shape == audio.shape
        stem.close()
    assert most[0] == max_pending


@pytest.mark.parametrize("fmt,bitrate", [("m4a", 256), ("opus", 160)])
def test_aac_and_opus_stems_are_one_stream_without_joins(tmp_path, fmt, bitrate):
    """Fed in stretches of random length on a pool, AAC and Opus stems are the very bytes of
    a one-shot encode (no join to click at), start on time (the encoder delay trimmed by the
    container) and last as long as the input, at the bitrate asked for."""
    audio = sweep(12.)
    with ThreadPoolExecutor(2) as pool:
        stem = StemFile(fmt, audio.shape[1], 2, RATE, pool, str(tmp_path), bitrate=bitrate)
        data = write_in_stretches(stem, audio, seed=3)
        stem.close()
    assert data == encode_stem(th.from_numpy(audio), RATE, fmt, bitrate)
    container = av.open(io.BytesIO(data))
    stream = container.streams.audio[0]
    assert (container.format.name.split(",")[0], stream.codec_context.name) == {
        "m4a": ("mov", "aac"), "opus": ("ogg", "opus")}[fmt]
    # how long a player plays it: AAC in MP4 by its edit list (the decoder gives whole 1024-
    # sample frames); Opus by its samples decoded (FFmpeg's stream duration counts the
    # encoder's pre-skip, which its decoder drops)
    played = (float(stream.duration * stream.time_base) if fmt == "m4a" else
              sum(frame.samples for frame in container.decode(audio=0)) / stream.rate)
    assert abs(played - 12.) < 0.002, played
    kbps = len(data) * 8 / 12. / 1000
    assert 0.8 * bitrate < kbps < 1.2 * bitrate, kbps
    written = decoded(data).numpy()  # at 44.1 kHz, Opus' 48 kHz resampled back
    lag = int(np.argmax([np.dot(written[0, k:k + RATE], audio[0, :RATE]) for k in range(64)]))
    assert lag <= 1, lag
    length = min(written.shape[1], audio.shape[1])
    error = rms(written[:, :length] - audio[:, :length]) / rms(audio)
    assert error < 0.1, error  # an encoded sweep: > 20 dB SNR everywhere it is compared


def test_mp3_quality_defaults_to_the_services_and_reaches_every_chunk(tiny_model, monkeypatch):
    """A request's `mp3_quality`, or the service's default where it leaves it out (Demucs' 2
    without one), is the quality every MP3 chunk of every stem is encoded at."""
    from serve_graph.settings import ServiceSettings
    assert SeparationOptions().encoder_quality == 2
    assert SeparationOptions().with_defaults(mp3_quality=7).mp3_quality == 7
    assert SeparationOptions(mp3_quality=0).with_defaults(mp3_quality=7).mp3_quality == 0
    assert ServiceSettings.from_args({"mp3_quality": 5}).mp3_quality == 5
    with pytest.raises(ValueError, match="mp3_quality"):
        ServiceSettings.from_args({"mp3_quality": 10})
    seen = []
    original = mp3.encode_frames

    def spy(pcm16, samplerate, bitrate=192, quality=mp3.DEFAULT_QUALITY):
        seen.append(quality)
        return original(pcm16, samplerate, bitrate, quality)
    monkeypatch.setattr(mp3, "encode_frames", spy)
    data = encode(tone(16., RATE, 2), RATE, "wavfloat")
    options = SeparationOptions(two_stems="vocals").with_defaults(mp3_quality=7)
    archive = zipfile.ZipFile(io.BytesIO(separate_to_zip(data, ModelRunner(tiny_model, "cpu"),
                                                         options)))
    assert archive.namelist() == ["vocals.mp3", "no_vocals.mp3"]
    assert len(seen) == 2 * len(mp3.chunk_bounds(16 * RATE)) >= 4 and set(seen) == {7}


def test_remix_is_the_stems_mixed_at_their_gains(tiny_model):
    """A remix is one file (no ZIP): the separated stems summed in source order at their
    gains, a stem named -inf left out, the others at 0 dB."""
    data = encode(tone(9., RATE, 2, seed=4), RATE, "wavfloat")
    options = SeparationOptions(remix="vocals=-12,drums=-inf", format="wav",
                                wav_depth="float32", clip="none")
    runner = ModelRunner(tiny_model, "cpu")
    remix = decoded(separate_to_zip(data, runner, options))
    drums, bass, other, vocals = separate(runner, decoded(data), shifts=1)
    assert options.result_media_type == "audio/wav"
    assert th.allclose(remix, bass + other + vocals * 10 ** (-12 / 20), atol=1e-6, rtol=0)
    silent = mix_stems({"bass": bass.numpy(), "vocals": vocals.numpy()},
                       {"bass": -np.inf, "vocals": -np.inf})
    assert np.array_equal(silent, np.zeros_like(bass.numpy()))


def test_stems_file_holds_the_master_and_the_four_stems_for_dj_software(tiny_model):
    """format=stems: one NI STEMS file, five AAC tracks as long as the song (the master, the
    sum of the stems, enabled; drums, bass, other, vocals after it) and the `stem` box."""
    from serve_graph.engine import ni_stems
    data = encode(tone(7., RATE, 2, seed=6), RATE, "wavfloat")
    options = SeparationOptions(format="stems")
    runner = ModelRunner(tiny_model, "cpu")
    stems_file = separate_to_zip(data, runner, options)
    container = av.open(io.BytesIO(stems_file))
    tracks = container.streams.audio
    assert [t.codec_context.name for t in tracks] == ["aac"] * 5
    assert [bool(t.disposition & av.stream.Disposition.default) for t in tracks] == [
        True, False, False, False, False]
    assert all(abs(float(t.duration * t.time_base) - 7.) < 0.002 for t in tracks)
    assert ni_stems.stem_box(stems_file) == ni_stems.metadata()
    assert [s["name"] for s in ni_stems.stem_box(stems_file)["stems"]] == [
        "Drums", "Bass", "Other", "Vocals"]
    samples = [np.concatenate([f.to_ndarray() for f in av.open(io.BytesIO(stems_file)).decode(
        audio=index)], axis=1) for index in range(5)]
    stems = prevent_clip(separate(runner, decoded(data), shifts=1).sum(0)).numpy()
    length = min(d.shape[1] for d in samples)
    assert rms(samples[0][:, :length] - sum(samples[1:])[:, :length]) < 0.05 * rms(stems)


def test_stem_box_joins_an_existing_udta_and_needs_moov_last():
    from serve_graph.engine import ni_stems
    track = encode_stem(th.from_numpy(sweep(1.)), RATE, "m4a", 128)
    once = ni_stems.add_stem_box(ni_stems.mux([track] * 2), {"first": 1})
    twice = ni_stems.add_stem_box(once, {"second": 2})
    udta = list(ni_stems._find(twice, (b"moov", b"udta")))
    assert len(udta) == 1 and ni_stems.stem_box(twice) == {"first": 1}
    inner = [kind for kind, *_ in ni_stems.boxes(twice, udta[0][0] + 8, sum(udta[0][::2]))]
    assert inner.count(b"stem") == 2 and len(av.open(io.BytesIO(twice)).streams.audio) == 2
    top = {kind: (offset, size) for kind, offset, _, size in ni_stems.boxes(once)}
    moov, mdat = (once[o:o + n] for o, n in (top[b"moov"], top[b"mdat"]))
    with pytest.raises(ValueError, match="moov box after"):
        ni_stems.add_stem_box(once[:top[b"mdat"][0]] + moov + mdat, {})
