"""HTTP range requests (RFC 9110, section 14) for files answered whole or in part: what a
`Range` header asks of a file of a known size. One range is served (`<audio>` and download
managers ask for one); a header that is not a valid single byte range is ignored, as the RFC
allows, and the whole file is answered."""
import re
import typing as tp

from ..engine.errors import SeparationError

RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiableError(SeparationError):
    status_code = 416
    error = "range_not_satisfiable"

    def __init__(self, size: int):
        super().__init__(f"the range asked for starts beyond the file's {size} bytes")
        self.headers = {"Content-Range": f"bytes */{size}"}


def requested_range(header: tp.Optional[str], size: int) -> tp.Optional[tp.Tuple[int, int]]:
    """`(first, last)` byte (inclusive) of a file of `size` bytes that `header` asks for,
    clipped to the file; None for the whole file (no header, or one this does not serve).
    `RangeNotSatisfiableError` when the range starts at or beyond the end (or asks for the
    last 0 bytes)."""
    match = RANGE.fullmatch((header or "").strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last `last` bytes
        if int(last) == 0:
            raise RangeNotSatisfiableError(size)
        return max(0, size - int(last)), size - 1
    if last != "" and int(last) < int(first):
        return None  # invalid: ignored
    if int(first) >= size:
        raise RangeNotSatisfiableError(size)
    return int(first), size - 1 if last == "" else min(int(last), size - 1)


def range_headers(span: tp.Optional[tp.Tuple[int, int]], size: int) -> tp.Dict[str, str]:
    """The headers of an answer of `span` of the file (None: all of it)."""
    if span is None:
        return {"Accept-Ranges": "bytes", "Content-Length": str(size)}
    first, last = span
    return {"Accept-Ranges": "bytes", "Content-Length": str(last - first + 1),
            "Content-Range": f"bytes {first}-{last}/{size}"}
