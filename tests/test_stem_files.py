"""One stem out of a stored ZIP (`stored_zip`) and the byte ranges of HTTP range requests
(`api.byte_ranges`), the parts of `GET /jobs/{id}/stems/{stem}` (over HTTP in test_jobs)."""
import io
import zipfile

import pytest

from serve_graph.api.byte_ranges import (RangeNotSatisfiableError, range_headers,
                                         read_span, requested_range)
from serve_graph.engine.audio import _zip_with_zipfile, zip_files
from serve_graph.stored_zip import stored_members

FILES = {"vocals.mp3": bytes(range(256)) * 40, "no_vocals.mp3": b"\x00\xff" * 777,
         "empty.wav": b""}


@pytest.mark.parametrize("write", [zip_files, _zip_with_zipfile])
def test_each_member_is_found_where_zipfile_reads_it(write):
    data = write(FILES)
    file = io.BytesIO(data)
    members = stored_members(file)
    assert list(members) == ["vocals", "no_vocals", "empty"]
    for name, content in FILES.items():
        member = members[name.split(".")[0]]
        assert (member.name, member.size) == (name, len(content))
        assert data[member.offset:member.offset + member.size] == content
        assert b"".join(read_span(file, member.offset, member.size, chunk=100)) == content


def test_a_compressed_or_broken_zip_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("vocals.wav", b"\x00" * 1000)
    with pytest.raises(ValueError, match="compressed"):
        stored_members(buffer)
    with pytest.raises(ValueError, match="not a ZIP"):
        stored_members(io.BytesIO(b"PK\x03\x04 nothing more"))


@pytest.mark.parametrize("header, span", [
    (None, None), ("bytes=0-99", (0, 99)), ("bytes=100-", (100, 999)),
    ("bytes=-100", (900, 999)), ("bytes=-5000", (0, 999)), ("bytes=990-5000", (990, 999)),
    ("bytes=999-999", (999, 999)), (" bytes=5-6 ", (5, 6)),
    # not a single valid byte range: ignored, the whole file answered (RFC 9110, 14.2)
    ("bytes=5-4", None), ("bytes=-", None), ("bytes=0-1,5-6", None), ("items=0-1", None),
    ("bytes=a-b", None), ("", None)])
def test_a_range_header_asks_for_a_span_of_the_file_or_the_whole(header, span):
    assert requested_range(header, 1000) == span


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0"])
def test_a_range_beyond_the_end_is_not_satisfiable(header):
    with pytest.raises(RangeNotSatisfiableError) as raised:
        requested_range(header, 1000)
    assert raised.value.status_code == 416
    assert raised.value.headers == {"Content-Range": "bytes */1000"}


def test_range_headers_say_what_part_is_answered():
    assert range_headers(None, 1000) == {"Accept-Ranges": "bytes", "Content-Length": "1000"}
    assert range_headers((10, 19), 1000) == {"Accept-Ranges": "bytes", "Content-Length": "10",
                                             "Content-Range": "bytes 10-19/1000"}
