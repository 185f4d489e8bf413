"""An MP3 decoded in parts by helper processes (`SplitDecoder`) gives the very samples of one
pass, and whatever goes wrong in the parts (a helper killed, a corrupt or cut file, a song over
the limit, a second song at once) ends as one pass would end it."""
import os
import signal
import threading

import numpy as np
import pytest

from serve_graph.engine import AudioTooLongError, InvalidAudioError, decode
from serve_graph.engine import split_decode
from serve_graph.engine.output import encode_stem
from serve_graph.engine.split_decode import SplitDecoder
from audio_files import encode, tone

RATE = 44100


def music(seconds: float, channels: int = 2, seed: int = 0) -> np.ndarray:
    """A tone with noise bursts: frames of very different sizes in the bit reservoir."""
    wav = tone(seconds, RATE, channels, seed)
    t = np.arange(wav.shape[1]) / RATE
    bursts = np.random.default_rng(seed).standard_normal(wav.shape) * (np.sin(3 * t) > 0.9)
    return (0.6 * wav + 0.3 * bursts).astype(np.float32)


@pytest.fixture(scope="module")
def split():
    decoder = SplitDecoder(helpers=2)
    yield decoder
    decoder.close()


@pytest.fixture(scope="module")
def song_mp3() -> bytes:
    return encode_stem(music(40.), RATE, "mp3", 192)


def parts_used(monkeypatch) -> list:
    """The samples each call of `SplitDecoder.decode` returned (None: it declined)."""
    results = []
    decode_in_parts = SplitDecoder.decode

    def recorded(self, *args):
        result = decode_in_parts(self, *args)
        results.append(None if result is None else result.shape[1])
        return result
    monkeypatch.setattr(SplitDecoder, "decode", recorded)
    return results


@pytest.mark.parametrize("bitrate,channels,encoder", [
    (320, 2, "lameenc"), (128, 2, "lameenc"), (64, 1, "lameenc"), (192, 2, "ffmpeg"),
    (32, 2, "ffmpeg"), (32, 1, "ffmpeg")])
def test_parts_give_the_samples_of_one_pass(split, monkeypatch, bitrate, channels, encoder):
    """Bit for bit, for CBR MP3s of several bitrates (the lower, the further back in frames
    the bit reservoir reaches) from LAME (lameenc) and from FFmpeg's libmp3lame."""
    wav = music(35., channels, seed=bitrate)
    data = (encode_stem(wav, RATE, "mp3", bitrate) if encoder == "lameenc"
            else encode(wav, RATE, "mp3", bitrate * 1000))
    used = parts_used(monkeypatch)
    in_parts = decode(data, split=split)
    assert used and used[0] == in_parts.shape[1]  # it was decoded in parts
    assert np.array_equal(in_parts, decode(data))


def test_a_helper_killed_is_replaced_and_its_song_still_decodes(split, song_mp3):
    one_pass = decode(song_mp3)
    helper = split._helpers[0]._process
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait()
    assert np.array_equal(decode(song_mp3, split=split), one_pass)  # in one pass, or parts again
    assert np.array_equal(decode(song_mp3, split=split), one_pass)
    assert split._helpers[0]._process.poll() is None  # a new helper runs


def test_what_is_not_for_parts_decodes_in_one_pass(split, monkeypatch):
    """A short song, another rate (to be converted) and another format: declined."""
    short = encode_stem(music(10.), RATE, "mp3", 192)
    other_rate = encode(music(35.)[:, ::2].copy(), 22050, "mp3")
    wav = encode(music(35.), RATE, "wav16")
    used = parts_used(monkeypatch)
    for data in (short, other_rate, wav):
        assert np.array_equal(decode(data, split=split), decode(data))
    assert used == [None, None]  # the two MP3s were declined; the WAV never asked


def test_a_corrupt_part_ends_as_one_pass_ends(split, song_mp3):
    """Garbage in the last part's packets: the same samples or the same error as one pass."""
    data = bytearray(song_mp3)
    at = len(data) * 3 // 4
    data[at:at + 5000] = np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()
    data = bytes(data)
    try:
        expected = decode(data)
    except InvalidAudioError as exc:
        with pytest.raises(InvalidAudioError) as raised:
            decode(data, split=split)
        assert str(raised.value) == str(exc)
    else:
        assert np.array_equal(decode(data, split=split), expected)


def test_a_cut_file_is_refused_as_one_pass_refuses_it(split, song_mp3):
    cut = song_mp3[:len(song_mp3) * 2 // 3]
    with pytest.raises(InvalidAudioError, match="truncated"):
        decode(cut)
    with pytest.raises(InvalidAudioError, match="truncated"):
        decode(cut, split=split)


def test_a_song_over_the_limit_is_refused(split, song_mp3):
    with pytest.raises(AudioTooLongError):
        decode(song_mp3, max_seconds=30, split=split)
    assert decode(song_mp3, max_seconds=40, split=split).shape[1] == 40 * RATE


def test_songs_at_once_share_the_helpers_and_decode_alike(split, song_mp3):
    """The helpers take one song at a time; the others decode in one pass meanwhile."""
    one_pass = decode(song_mp3)
    results = [None] * 4

    def run(index):
        results[index] = decode(song_mp3, split=split)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(result, one_pass) for result in results)


def test_helpers_stop_with_their_decoder(song_mp3):
    decoder = SplitDecoder(helpers=1)
    process = decoder._helpers[0]._process
    assert np.array_equal(decode(song_mp3, split=decoder), decode(song_mp3))
    decoder.close()
    assert process.poll() is not None


def test_a_helper_that_hangs_is_stopped(song_mp3, monkeypatch):
    """A helper that never answers (a decoder caught in a loop) costs the song a timeout, not
    its answer: it is stopped and the song decoded in one pass."""
    decoder = SplitDecoder(helpers=1)
    monkeypatch.setattr(split_decode, "PART_TIMEOUT_S", 0.5)
    os.kill(decoder._helpers[0]._process.pid, signal.SIGSTOP)
    try:
        assert np.array_equal(decode(song_mp3, split=decoder), decode(song_mp3))
    finally:
        decoder.close()


def test_memory_given_back_is_the_next_songs(song_mp3):
    """Samples handed back with `recycle` are where the next song decodes (warm pages, not
    fresh ones); samples never handed back stay the caller's, untouched by later songs."""
    decoder = SplitDecoder(helpers=1)
    try:
        kept = decode(song_mp3, split=decoder)
        copy = kept.copy()
        second = decode(song_mp3, split=decoder)
        assert second.ctypes.data != kept.ctypes.data and np.array_equal(kept, copy)
        decoder.recycle(second)
        third = decode(song_mp3, split=decoder)
        assert third.ctypes.data == second.ctypes.data and np.array_equal(third, copy)
    finally:
        decoder.close()


def test_decode_runs_without_helpers_where_none_can_start(monkeypatch):
    """Decode asks for none (decode_helpers: 0), or the machine cannot make a memfd or start
    a process (a sandbox): every song decodes in one pass instead of the replica failing."""
    from serve_graph import decode as deployment

    def refused(*args):
        raise OSError(38, "Function not implemented")
    assert deployment._split_decoder(0) is None
    monkeypatch.setattr(split_decode.os, "memfd_create", refused)
    assert deployment._split_decoder(1) is None
    with pytest.raises(ValueError):
        SplitDecoder(0)
