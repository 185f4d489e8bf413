"""HTTP range requests (RFC 9110, section 14) for files answered whole or in part: what a
`Range` header asks of a file of a known size. One range is served (`<audio>` and download
managers ask for one); a header that is not a valid single byte range is ignored, as the RFC
allows, and the whole file is answered."""
import asyncio
import re
import typing as tp

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..engine.errors import SeparationError
from ..job_files import CHUNK

RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiableError(SeparationError):
    status_code = 416
    error = "range_not_satisfiable"

    def __init__(self, size: int):
        super().__init__(f"the range asked for starts at or past the end of the file "
                         f"({size} bytes)")
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


def ranged_file(request: Request, file: tp.BinaryIO, size: int, etag: str, media_type: str,
                headers: tp.Dict[str, str], offset: int = 0) -> Response:
    """The answer to `request` of the `size` bytes of `file` from `offset`: whole (200), or
    the range its `Range` header asks for (206; `If-Range` naming another `etag`: whole); to
    a HEAD, the same headers alone (a download manager learning the size).
    `RangeNotSatisfiableError` for a range past the end. `file` is closed when the answer has
    been sent, or now on an error."""
    try:
        same = request.headers.get("if-range", etag) == etag
        span = requested_range(request.headers.get("range") if same else None, size)
    except BaseException:
        file.close()
        raise
    first, last = span or (0, size - 1)
    status, headers = 200 if span is None else 206, {**headers, **range_headers(span, size),
                                                     "ETag": etag}
    if request.method == "HEAD":  # what a GET would answer, without its body
        file.close()
        return Response(status_code=status, media_type=media_type, headers=headers)
    return StreamingResponse(span_chunks(file, offset + first, last - first + 1),
                             status_code=status, media_type=media_type, headers=headers)


async def span_chunks(file: tp.BinaryIO, start: int, length: int) -> tp.AsyncIterator[bytes]:
    """`length` bytes of `file` from `start`, read off the event loop; closes it."""
    try:
        pieces = read_span(file, start, length)
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            yield piece
    finally:
        file.close()


def read_span(file: tp.BinaryIO, start: int, length: int,
              chunk: int = CHUNK) -> tp.Iterator[bytes]:
    """`length` bytes of `file` from `start`, in pieces of at most `chunk`."""
    file.seek(start)
    while length > 0:
        piece = file.read(min(chunk, length))
        if not piece:
            raise ValueError("the file ends before the span")
        length -= len(piece)
        yield piece
