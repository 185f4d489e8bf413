"""Fetching a URL a client gave (a song by `audio_url`) and posting to one (a job's
`callback_url`) without letting either reach inside the cluster (SSRF).

Every hop is checked before it is connected to: the scheme (http or https only), the host
resolved and *every* address it resolves to refused when it is loopback, private, link-local
(169.254.0.0/16: cloud metadata), multicast, unspecified, reserved or shared (100.64.0.0/10),
IPv6's equivalents, and IPv4-mapped or -compatible IPv6 forms of those. The connection then
goes to the address that was checked (no second lookup a DNS rebinding could change), with the
URL's host name for TLS and `Host`. Redirects are followed by hand, each hop checked again.
An operator's allow-list of networks (`allow`) is the only way to a private host.
The body is streamed under a byte limit and the whole fetch under a deadline.
"""
import http.client
import ipaddress
import socket
import ssl
import time
import typing as tp
from urllib.parse import urljoin, urlsplit

from .engine.errors import InvalidParameterError, UploadTooLargeError

MAX_REDIRECTS = 5
READ_CHUNK = 1 << 16
Network = tp.Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = tp.Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class UrlRefusedError(InvalidParameterError):
    """The URL may not be fetched: its scheme, or an address it resolves to (422)."""
    error = "url_refused"


class UrlFetchError(InvalidParameterError):
    """The URL was allowed but could not be fetched: unreachable, an HTTP error, too slow.
    `http_status`: the status the server answered, when it answered one."""
    error = "url_fetch_failed"

    def __init__(self, detail: str, http_status: tp.Optional[int] = None):
        super().__init__(detail)
        self.http_status = http_status


def networks(allow: tp.Iterable[str]) -> tp.Tuple[Network, ...]:
    """The allow-list's networks (`127.0.0.1/32`, `10.0.0.0/8`, `::1`...)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in allow)


def address_problem(address: Address, allow: tp.Sequence[Network] = ()) -> tp.Optional[str]:
    """Why `address` may not be connected to (None: it may)."""
    if any(address in network for network in allow):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            if int(address) >> 32 == 0 and int(address) > 1 else None)  # ::a.b.c.d
        if embedded is not None:
            return address_problem(embedded, allow)
    for kind in ("loopback", "private", "link_local", "multicast", "unspecified",
                 "reserved"):
        if getattr(address, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return f"{address} is a shared (carrier-grade NAT) address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


_SHARED = ipaddress.ip_network("100.64.0.0/10")


def checked_addresses(url: str, allow: tp.Sequence[Network] = ()
                      ) -> tp.Tuple[tp.Any, tp.List[Address]]:
    """`url` split, and the addresses its host resolves to, every one allowed; raises
    `UrlRefusedError` naming what is refused, `UrlFetchError` when the host does not resolve."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise UrlRefusedError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefusedError(f"only http and https URLs are fetched, not {parts.scheme!r}")
    if not parts.hostname:
        raise UrlRefusedError(f"the URL {url!r} names no host")
    if parts.username or parts.password:
        raise UrlRefusedError("URLs with credentials are not fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise UrlFetchError(f"cannot resolve {parts.hostname!r}: {exc}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0])
                                   for info in infos))
    for address in addresses:
        problem = address_problem(address, allow)
        if problem:
            raise UrlRefusedError(f"{parts.hostname!r} resolves to {problem}: not fetched")
    return parts, addresses


def fetch(url: str, max_bytes: int, timeout_s: float, allow: tp.Sequence[Network] = (),
          ) -> bytes:
    """The body of `url`, at most `max_bytes` (else `UploadTooLargeError`), within
    `timeout_s` in all, each redirect hop checked like the first."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts, addresses = checked_addresses(url, allow)
        response, connection = _request(parts, addresses[0], deadline)
        try:
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise UrlFetchError(f"a redirect from {url!r} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise UrlFetchError(f"{url!r} answered HTTP {response.status}",
                                    response.status)
            return _body(response, max_bytes, deadline)
        finally:
            connection.close()
    raise UrlFetchError(f"more than {MAX_REDIRECTS} redirects")


def post(url: str, body: bytes, headers: tp.Dict[str, str], timeout_s: float,
         allow: tp.Sequence[Network] = ()) -> int:
    """POST `body` to `url` (checked like `fetch`'s; redirects are not followed) within
    `timeout_s`: the answer's HTTP status. Raises `UrlRefusedError` or `UrlFetchError`."""
    deadline = time.monotonic() + timeout_s
    parts, addresses = checked_addresses(url, allow)
    response, connection = _request(parts, addresses[0], deadline, "POST", body,
                                    {"Content-Type": "application/json",
                                     "User-Agent": "serve_graph", **headers})
    try:
        response.read(READ_CHUNK)  # the receiver's answer is not kept
        return response.status
    except (OSError, http.client.HTTPException):
        return response.status
    finally:
        connection.close()


def _request(parts, address: Address, deadline: float, method: str = "GET",
             body: tp.Optional[bytes] = None, headers: tp.Optional[dict] = None):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise UrlFetchError("the URL took too long")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    connection = _PinnedConnection(parts.hostname, port, str(address), parts.scheme == "https",
                                   remaining)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, path, body=body,
                           headers=headers or {"User-Agent": "serve_graph",
                                               "Accept": "audio/*, */*"})
        return connection.getresponse(), connection
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise UrlFetchError(f"cannot fetch {parts.geturl()!r}: {exc}") from None


def _body(response, max_bytes: int, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise UploadTooLargeError(f"the URL's file is larger than the limit of "
                                  f"{max_bytes / 2**20:g} MB")
    chunks, total = [], 0
    try:
        while True:
            if time.monotonic() > deadline:
                raise UrlFetchError("the URL took too long")
            chunk = response.read(READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > max_bytes:
                raise UploadTooLargeError(f"the URL's file is larger than the limit of "
                                          f"{max_bytes / 2**20:g} MB")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as exc:
        raise UrlFetchError(f"the download broke off: {exc}") from None


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) to the address that was checked, with the URL's host for `Host` and TLS."""

    def __init__(self, host: str, port: int, address: str, tls: bool, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address, self._tls = address, tls
        if not tls:
            self.default_port = 80

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._tls:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)
