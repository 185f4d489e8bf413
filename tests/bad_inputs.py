"""A corpus of hostile and broken requests for `POST /separate`, generated here (no files
checked in): broken audio of every format the tests write, lying headers, files that are not
audio, playlists that point elsewhere, parameters out of range and malformed multipart.

`upload_cases(...)` → `{name: (file bytes or None, form fields)}`, sent as a normal multipart
upload; `raw_cases()` → `{name: requests.post keyword arguments}` for what a normal upload
cannot express; `url_cases()` and `callback_cases()` → URLs inside the network, as a song's
`audio_url` and a job's `callback_url`, and `REDIRECTS_INSIDE`, where a redirect may not lead.
Every case must be answered with a 4xx `{"error", "detail"}`.
"""
import io
import os
import socket
import struct
import threading
import typing as tp
import zlib

import av
import numpy as np
import soundfile

from audio_files import FORMATS, encode, tone


def float_wav(samples, rate: int = 44100) -> bytes:
    """A 32-bit float WAV of `samples [T, C]` (any values, NaN and inf included)."""
    buf = io.BytesIO()
    soundfile.write(buf, np.asarray(samples, dtype=np.float32), rate, format="WAV",
                    subtype="FLOAT")
    return buf.getvalue()


def with_rate(wav: bytes, rate: int) -> bytes:
    """`wav` with another sample rate written in its header (bytes 24-31: rate, byte rate)."""
    block = struct.unpack("<H", wav[32:34])[0]
    return wav[:24] + struct.pack("<II", rate, (rate * block) & 0xFFFFFFFF) + wav[32:]


def with_channels(wav: bytes, channels: int) -> bytes:
    """`wav` whose header declares `channels` (byte 22) and the matching byte rate and block
    size, over samples written for its real channel count."""
    rate, _, _, bits = struct.unpack("<IIHH", wav[24:36])
    block = channels * bits // 8
    return (wav[:22] + struct.pack("<HIIH", channels, rate, rate * block, block) + wav[34:])


def lying_length(wav: bytes, factor: int) -> bytes:
    """`wav` whose RIFF and data chunk sizes declare `factor` times the samples it holds."""
    data_at = wav.index(b"data") + 4
    size = struct.unpack("<I", wav[data_at:data_at + 4])[0] * factor
    return (wav[:4] + struct.pack("<I", size + data_at) + wav[8:data_at] +
            struct.pack("<I", size) + wav[data_at + 4:])


def lying_flac(flac: bytes, factor: int) -> bytes:
    """`flac` whose STREAMINFO declares `factor` times the samples it holds (36 bits at
    bytes 21-25 of the file, after the 4-bit low half of the bits-per-sample field)."""
    field = int.from_bytes(flac[21:26], "big")
    total = (field & (2**36 - 1)) * factor
    return flac[:21] + ((field & ~(2**36 - 1)) | total).to_bytes(5, "big") + flac[26:]


def id3_without_audio() -> bytes:
    """An ID3v2.4 tag (a title) and nothing after it."""
    title = b"\x03" + b"A song with no audio"
    frame = b"TIT2" + struct.pack(">I", len(title)) + b"\0\0" + title
    size = len(frame)
    synchsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + synchsafe + frame


def video_without_audio() -> bytes:
    """An MP4 of ten frames of MPEG-4 video and no audio stream."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), index * 20, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def png_image() -> bytes:
    """A 2×2 grey PNG."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body +
                struct.pack(">I", zlib.crc32(kind + body)))
    rows = b"".join(b"\0" + b"\x80" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def audio_file(fmt: str, seconds: float = 3.0) -> bytes:
    rate = 48000 if fmt == "opus" else 44100  # Opus encodes at 48 kHz only
    return encode(tone(seconds, rate), rate, fmt)


def broken_files() -> tp.Dict[str, bytes]:
    """Every test format cut in half and cut to its first 64 bytes."""
    cases = {}
    for fmt in FORMATS:
        data = audio_file(fmt)
        cases[f"{fmt} cut in half"] = data[:len(data) // 2]
        cases[f"{fmt} header only"] = data[:64]
    return cases


def upload_cases(song: bytes, max_upload_mb: float, max_seconds: float
                 ) -> tp.Dict[str, tp.Tuple[tp.Optional[bytes], dict]]:
    """`{name: (file bytes or None for no file, form fields)}`; `song` is a good upload."""
    quiet = 0.1 * np.ones((44100, 2))
    wav16 = audio_file("wav16")
    files = {
        "nan samples": float_wav(np.where(np.arange(88200).reshape(-1, 2) % 7, 0.1, np.nan)),
        "all nan": float_wav(np.full((44100, 2), np.nan)),
        "inf samples": float_wav(np.concatenate([quiet, [[np.inf, -np.inf]]])),
        "1e30 samples": float_wav(np.full((44100, 2), 1e30)),
        "one sample": float_wav([[0.1, 0.2]]),
        "no samples": float_wav(np.zeros((0, 2))),
        "rate of 1 Hz": with_rate(float_wav(quiet[:100]), 1),
        "rate of 4 GHz": with_rate(float_wav(quiet), 4_000_000_000),
        "0 channels": with_channels(wav16, 0),
        "header declares 10x the samples (wav)": lying_length(float_wav(quiet), 10),
        "header declares 3x the samples (flac)": lying_flac(audio_file("flac"), 3),
        "ID3 tag without audio": id3_without_audio(),
        "video without audio": video_without_audio(),
        "png image": png_image(),
        "empty file": b"",
        "text file": b"this is not audio\n" * 100,
        "random bytes": np.random.default_rng(0).bytes(50000),
        "upload too large": b"\0" * int(max_upload_mb * 2**20 + 100_000),
        "audio too long": encode(tone(max_seconds + 5, 22050, 1), 22050, "flac"),
        **broken_files(),
    }
    fields = {
        "overlap 0.999999": {"overlap": 0.999999},
        "over the window budget": {"overlap": 0.99, "shifts": 20},
        "unknown two_stems": {"two_stems": "guitar"},
        "two_stems in capitals": {"two_stems": "VOCALS"},
        "negative shifts": {"shifts": -1},
        "too many shifts": {"shifts": 21},
        "fractional shifts": {"shifts": 1.5},
        "shifts not a number": {"shifts": "many"},
        "negative overlap": {"overlap": -0.1},
        "overlap of one": {"overlap": 1.0},
        "overlap nan": {"overlap": "nan"},
        "overlap inf": {"overlap": "inf"},
        "mp3 neither true nor false": {"mp3": "maybe"},
        "low bitrate": {"mp3_bitrate": 127},
        "high bitrate": {"mp3_bitrate": 321},
        "bitrate not a number": {"mp3_bitrate": "loud"},
        "negative mp3 quality": {"mp3_quality": -1},
        "mp3 quality above 9": {"mp3_quality": 10},
        "mp3 quality not a number": {"mp3_quality": "best"},
        "unknown format": {"format": "aac"},
        "format in capitals": {"format": "M4A"},
        "low aac bitrate": {"format": "m4a", "aac_bitrate": 63},
        "high aac bitrate": {"format": "m4a", "aac_bitrate": 321},
        "low opus bitrate": {"format": "opus", "opus_bitrate": 31},
        "high opus bitrate": {"format": "opus", "opus_bitrate": 257},
        "opus bitrate not a number": {"format": "opus", "opus_bitrate": "-inf"},
        "remix gain above +12 dB": {"remix": "vocals=13"},
        "remix gain not a number": {"remix": "vocals=loud"},
        "remix gain nan": {"remix": "vocals=nan"},
        "remix of an unknown stem": {"remix": "guitar=-3"},
        "remix gain below -60 dB": {"remix": "drums=-60.5"},
        "remix gain +inf": {"remix": "bass=inf"},
        "remix with two_stems": {"remix": "vocals=-12", "two_stems": "vocals"},
        "stems format with two_stems": {"format": "stems", "two_stems": "vocals"},
        "stems format with a remix": {"format": "stems", "remix": "drums=-inf"},
        "empty shifts": {"shifts": ""},
        "empty wav_depth": {"format": "wav", "wav_depth": ""},
        "unknown field": {"shift": 2},
    }
    return {"missing file": (None, {}), **{name: (data, {}) for name, data in files.items()},
            **{name: (song, values) for name, values in fields.items()}}


def raw_cases() -> tp.Dict[str, dict]:
    """Requests a well-formed multipart upload cannot express: `requests.post` arguments."""
    boundary = "b0undary"
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio_file\"; "
            f"filename=\"a.wav\"\r\n\r\n").encode() + b"RIFF" + b"\0" * 100
    return {
        "multipart without boundary": dict(data=b"--x\r\n", headers={
            "Content-Type": "multipart/form-data"}),
        "not multipart": dict(data=b"audio", headers={
            "Content-Type": "application/octet-stream"}),
        "json body": dict(json={"audio_file": "c29uZw==", "shifts": 1}),
        "multipart never closed": dict(data=part, headers=multipart),
        "part without a name": dict(data=(
            f"--{boundary}\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--{boundary}--\r\n"
        ).encode(), headers=multipart),
        "form field of 10 MB": dict(files={"audio_file": ("a.mp3", b"x" * 1000)},
                                    data={"two_stems": "v" * 10_000_000}),
        "10,000 form fields": dict(files={"audio_file": ("a.mp3", b"x" * 1000)},
                                   data=[(f"f{index}", "1") for index in range(10_000)]),
        "filename of 10,000 characters": dict(files={"audio_file": ("a" * 10_000 + ".mp3",
                                                                    b"not audio")}),
        "audio_file sent twice": dict(files=[("audio_file", ("a.wav", audio_file("wav16"))),
                                             ("audio_file", ("b.wav", audio_file("wav16")))]),
        "audio_file as a text field": dict(data={"audio_file": "song.mp3"}),
        "shifts sent twice": dict(files={"audio_file": ("a.wav", audio_file("wav16"))},
                                  data=[("shifts", "1"), ("shifts", "2")]),
    }


# Addresses inside the network, in every form a URL can write them: each refused (422) as a
# song's `audio_url` and as a job's `callback_url` on a service with no allow-list.
INSIDE = {
    "loopback": "http://127.0.0.1:8000/song.mp3",
    "loopback by name": "http://localhost/song.mp3",
    "loopback, short form": "http://127.1/song.mp3",
    "loopback, decimal": "http://2130706433/song.mp3",
    "loopback, hexadecimal": "http://0x7f000001/song.mp3",
    "IPv6 loopback": "http://[::1]/song.mp3",
    "IPv4-mapped IPv6 loopback": "http://[::ffff:127.0.0.1]/song.mp3",
    "IPv4-compatible IPv6 private": "http://[::10.0.0.1]/song.mp3",
    "6to4 of a private address": "http://[2002:a00:1::1]/song.mp3",
    "unspecified": "http://0.0.0.0/song.mp3",
    "cloud metadata": "http://169.254.169.254/latest/meta-data/",
    "IPv4-mapped cloud metadata": "http://[::ffff:169.254.169.254]/latest/",
    "private 10/8": "http://10.0.0.1/song.mp3",
    "private 172.16/12": "http://172.16.5.4/song.mp3",
    "private 192.168/16": "http://192.168.1.1/song.mp3",
    "shared 100.64/10": "http://100.64.0.1/song.mp3",
    "IPv6 link-local": "http://[fe80::1]/song.mp3",
    "IPv6 unique local": "http://[fd00::1]/song.mp3",
    "multicast": "http://224.0.0.1/song.mp3",
    "file scheme": "file:///etc/passwd",
    "ftp scheme": "ftp://example.com/song.mp3",
    "gopher scheme": "gopher://127.0.0.1:6379/_INFO",
    "credentials in the URL": "http://user:secret@example.com/song.mp3",
    "no host": "http:///song.mp3",
}


# Where a redirect from an allowed host may not lead (the tests' allowed host is 127.0.0.1):
# each hop is checked like the first.
REDIRECTS_INSIDE = {
    "redirect to cloud metadata": "http://169.254.169.254/latest/meta-data/",
    "redirect to a private address": "http://10.0.0.1/song.mp3",
    "redirect to IPv4-mapped metadata": "http://[::ffff:169.254.169.254]/",
    "redirect to IPv6 loopback": "http://[::1]/song.mp3",
    "redirect to a file": "file:///etc/passwd",
    "redirect to gopher": "gopher://127.0.0.1:6379/_INFO",
}


def url_cases() -> tp.Dict[str, str]:
    """`{name: audio_url}`: songs by URL that must be refused (422 url_refused)."""
    return {f"audio_url: {name}": url for name, url in INSIDE.items()}


def callback_cases() -> tp.Dict[str, str]:
    """`{name: callback_url}`: job callbacks that must be refused (422 url_refused)."""
    return {f"callback_url: {name}": url.replace("/song.mp3", "/hook")
            for name, url in INSIDE.items()}


def playlists(path: str, port: int) -> tp.Dict[str, str]:
    """Files that make FFmpeg's playlist and session demuxers open `path` and
    `127.0.0.1:port`."""
    url = f"http://127.0.0.1:{port}"
    return {
        "hls playlist": (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\nfile:{path}\n"
                         f"#EXTINF:3.0,\n{url}/segment.ts\n#EXT-X-ENDLIST\n"),
        "ffconcat list": f"ffconcat version 1.0\nfile '{path}'\nfile '{url}/song.wav'\n",
        "m3u playlist": f"#EXTM3U\n#EXTINF:3,song\n{path}\n{url}/song.mp3\n",
        "sdp session": (f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=song\nc=IN IP4 127.0.0.1\nt=0 0\n"
                        f"m=audio {port} RTP/AVP 0\na=control:rtsp://127.0.0.1:{port}/song\n"),
    }


class Sentinels:
    """A FIFO at `fifo` and a TCP listener on 127.0.0.1:`port` that record who opens them:
    a thread blocks writing the FIFO until some reader opens it; the listener accepts."""

    def __init__(self, fifo):
        self.fifo, self.hits, self._closing = fifo, [], False
        os.mkfifo(fifo)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._watch_fifo, daemon=True),
                         threading.Thread(target=self._accept, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _watch_fifo(self):
        with open(self.fifo, "wb"):  # returns once a reader opens the FIFO
            if not self._closing:
                self.hits.append(f"{self.fifo} was opened")

    def _accept(self):
        while not self._closing:
            try:
                connection, peer = self._listener.accept()
            except socket.timeout:
                continue
            self.hits.append(f"connection from {peer}")
            connection.close()

    def close(self) -> list:
        """Stop watching (releasing the FIFO's writer by opening it here); the hits."""
        self._closing = True
        reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        for thread in self._threads:
            thread.join(5)
        os.close(reader)
        self._listener.close()
        return self.hits
