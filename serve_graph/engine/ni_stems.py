"""Native Instruments' STEMS files (`<song>.stem.mp4`), which Traktor, Mixxx and other DJ
software open: the master and four stems as the five AAC tracks of one MP4 (drums, bass,
other, vocals after the master, Traktor's order; only the master's track enabled), and NI's
`stem` box in `moov/udta`: JSON of the stems' names and colours, the format's version and
the mastering settings a player applies to them.

NI's own tool (ni-stem, which stemgen bundles) and stempeg mux the tracks and add the box
with gpac's MP4Box (`-udta 0:type=stem:src=...`); MP4Box is not packaged for Debian 12, so
here FFmpeg muxes the tracks (PyAV, their packets copied, nothing encoded again) and the box
is added to `moov` by `add_stem_box`. FFmpeg writes `moov` after the media data, so adding to
it moves no sample: the chunk offsets stay true.
"""
import io
import json
import struct
import typing as tp

import av

from .options import STEMS_ORDER as TRAKTOR_ORDER
# the colours NI's stem creator and stempeg give these four by default
COLOURS = {"drums": "#009E73", "bass": "#D55E00", "other": "#CC79A7", "vocals": "#56B4E9"}
# NI's default mastering settings, both off: a player plays the stems as they are
MASTERING = {"compressor": {"enabled": False, "ratio": 3, "output_gain": 0.5, "release": 0.3,
                            "attack": 0.003, "input_gain": 0.5, "threshold": 0,
                            "hp_cutoff": 300, "dry_wet": 50},
             "limiter": {"enabled": False, "release": 0.05, "threshold": 0,
                         "ceiling": -0.35}}


def metadata(stems: tp.Sequence[str] = TRAKTOR_ORDER) -> dict:
    """The `stem` box's JSON for `stems` (in track order, after the master)."""
    return {"version": 1, "mastering_dsp": MASTERING,
            "stems": [{"name": name.capitalize(), "color": COLOURS.get(name, "#FFFFFF")}
                      for name in stems]}


def container(tracks: tp.Sequence[bytes], stems: tp.Sequence[str] = TRAKTOR_ORDER) -> bytes:
    """One STEMS file of `tracks` (M4A files of one AAC stream each: the master, then
    `stems`), with the `stem` box."""
    return add_stem_box(mux(tracks), metadata(stems))


def mux(tracks: tp.Sequence[bytes]) -> bytes:
    """The audio streams of `tracks` as the tracks of one MP4 (brand M4A), in order, their
    packets copied and interleaved by time; FFmpeg enables the first track only."""
    inputs = [av.open(io.BytesIO(track)) for track in tracks]
    buffer = io.BytesIO()
    output = av.open(buffer, mode="w", format="mp4",
                     options={"brand": "M4A ", "fflags": "+bitexact"})
    packets = []
    for index, source in enumerate(inputs):
        stream = output.add_stream_from_template(source.streams.audio[0])
        stream.metadata["handler_name"] = "SoundHandler"
        for packet in source.demux(source.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = stream
                packets.append((float(packet.dts * packet.time_base), index, packet))
    for _, _, packet in sorted(packets, key=lambda item: item[:2]):
        output.mux(packet)
    output.close()
    for source in inputs:
        source.close()
    return buffer.getvalue()


def boxes(data: bytes, start: int = 0, end: tp.Optional[int] = None
          ) -> tp.Iterator[tp.Tuple[bytes, int, int, int]]:
    """The ISO BMFF boxes in `data[start:end]`: `(type, offset, header size, size)`."""
    end = len(data) if end is None else end
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            raise ValueError(f"a broken {kind!r} box at byte {position}")
        yield kind, position, header, size
        position += size


def add_stem_box(mp4: bytes, content: dict) -> bytes:
    """`mp4` with a `stem` box of `content` (JSON) at the end of `moov/udta` (a `udta` made
    when there is none). `moov` must come after the media data (FFmpeg's order)."""
    top = {kind: (offset, header, size) for kind, offset, header, size in boxes(mp4)}
    if b"moov" not in top or b"mdat" not in top or top[b"moov"][0] < top[b"mdat"][0]:
        raise ValueError("expected an MP4 with its moov box after its media data")
    moov, moov_header, moov_size = top[b"moov"]
    box = _box(b"stem", json.dumps(content).encode())
    udta = [(offset, header, size) for kind, offset, header, size in
            boxes(mp4, moov + moov_header, moov + moov_size) if kind == b"udta"]
    if udta:
        offset, header, size = udta[0]
        grown = (_resized(mp4[offset:offset + header], header, size + len(box))
                 + mp4[offset + header:offset + size] + box)
        body = mp4[moov + moov_header:offset] + grown + mp4[offset + size:moov + moov_size]
    else:
        body = mp4[moov + moov_header:moov + moov_size] + _box(b"udta", box)
    moov_box = _resized(mp4[moov:moov + moov_header], moov_header,
                        moov_header + len(body)) + body
    return mp4[:moov] + moov_box + mp4[moov + moov_size:]


def stem_box(mp4: bytes) -> tp.Optional[dict]:
    """The JSON of `mp4`'s `moov/udta/stem` box; None without one."""
    for path in _find(mp4, (b"moov", b"udta", b"stem")):
        offset, header, size = path
        return json.loads(mp4[offset + header:offset + size])
    return None


def _find(data: bytes, path: tp.Sequence[bytes], start: int = 0,
          end: tp.Optional[int] = None) -> tp.Iterator[tp.Tuple[int, int, int]]:
    for kind, offset, header, size in boxes(data, start, end):
        if kind != path[0]:
            continue
        if len(path) == 1:
            yield offset, header, size
        else:
            yield from _find(data, path[1:], offset + header, offset + size)


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _resized(header_bytes: bytes, header: int, size: int) -> bytes:
    """A box's header (`header` bytes) saying `size` instead."""
    if header == 16:
        return header_bytes[:8] + struct.pack(">Q", size)
    if size >= 2 ** 32:
        raise ValueError("a box of 4 GiB or more")
    return struct.pack(">I", size) + header_bytes[4:8]
