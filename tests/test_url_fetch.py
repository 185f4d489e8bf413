"""The SSRF-safe fetcher (serve_graph/url_fetch.py) against a real HTTP server on 127.0.0.1:
what it refuses (every private, loopback, link-local... form, IPv6 and IPv4-mapped ones too,
other schemes, redirects to them), the operator's allow-list, the byte limit, the deadline."""
import http.server
import ipaddress
import threading
import time

import pytest

from serve_graph.engine.errors import UploadTooLargeError
from serve_graph.url_fetch import (UrlFetchError, UrlRefusedError, address_problem,
                                   checked_addresses, fetch, networks)

LOCAL = networks(["127.0.0.1/32"])
BODY = b"ID3" + bytes(range(256)) * 40


class Handler(http.server.BaseHTTPRequestHandler):
    routes = {
        "/song.mp3": (200, {"Content-Length": str(len(BODY))}, BODY),
        "/chunked": (200, {}, BODY),  # no length: closed at the end
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-file": (301, {"Location": "file:///etc/passwd"}, b""),
        "/to-song": (307, {"Location": "/song.mp3"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow":
            time.sleep(1.5)
        status, headers, body = self.routes.get(self.path, (404, {}, b"no"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that gave up (the deadline test) breaks the pipe: expected here


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


REFUSED = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1",
           "169.254.169.254", "224.0.0.1", "0.0.0.0", "100.64.0.1", "240.0.0.1", "::1",
           "fe80::1", "fc00::1", "ff02::1", "::", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
           "::ffff:10.0.0.1", "::127.0.0.1", "2002:7f00:1::1", "2002:a9fe:a9fe::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_private_and_special_addresses_are_refused(address):
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


def test_the_allow_list_is_the_only_way_to_a_private_host():
    assert address_problem(ipaddress.ip_address("127.0.0.1"), LOCAL) is None
    assert address_problem(ipaddress.ip_address("::ffff:127.0.0.1"), LOCAL) is None
    assert address_problem(ipaddress.ip_address("127.0.0.2"), LOCAL) is not None


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/song.mp3",
                                 "gopher://127.0.0.1:70/_x", "http://localhost/song.mp3",
                                 "http://[::1]/song.mp3", "http://[::ffff:127.0.0.1]/",
                                 "http://user:secret@8.8.8.8/", "http:///song.mp3"])
def test_other_schemes_local_names_and_credentials_are_refused(url):
    with pytest.raises(UrlRefusedError):
        checked_addresses(url)


def test_a_song_is_fetched_only_through_the_allow_list(server):
    with pytest.raises(UrlRefusedError, match="loopback"):
        fetch(server + "/song.mp3", 1 << 20, 10)
    assert fetch(server + "/song.mp3", 1 << 20, 10, LOCAL) == BODY
    assert fetch(server + "/chunked", 1 << 20, 10, LOCAL) == BODY
    assert fetch(server + "/to-song", 1 << 20, 10, LOCAL) == BODY  # a redirect, checked


@pytest.mark.parametrize("path,refused", [("/to-metadata", UrlRefusedError),
                                          ("/to-file", UrlRefusedError),
                                          ("/loop", UrlFetchError),
                                          ("/missing", UrlFetchError)])
def test_redirects_to_forbidden_places_and_failures_are_refused(server, path, refused):
    with pytest.raises(refused):
        fetch(server + path, 1 << 20, 10, LOCAL)


def test_the_byte_limit_and_the_deadline_hold(server):
    for path in ("/song.mp3", "/chunked"):  # with and without Content-Length
        with pytest.raises(UploadTooLargeError):
            fetch(server + path, len(BODY) - 1, 10, LOCAL)
    start = time.monotonic()
    with pytest.raises(UrlFetchError):
        fetch(server + "/slow", 1 << 20, 0.5, LOCAL)
    assert time.monotonic() - start < 1.4
