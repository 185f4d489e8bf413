"""Real HTTP servers on 127.0.0.1 for the integration tests: one that serves songs (and
redirects, errors, slow and oversized answers) for `audio_url`, and a webhook receiver that
records every callback and can be told to fail the first attempts."""
import http.server
import threading
import time
import typing as tp


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # a client that gave up at its deadline


class Server:
    """A threading HTTP server on a free port of 127.0.0.1, running `handler` until
    `close()`."""

    def __init__(self, handler: type):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def song_server(files: tp.Dict[str, bytes], slow_s: float = 0.,
                unavailable: tp.Optional[tp.Dict[str, int]] = None) -> Server:
    """GET `/<name>` → `files[name]`; `/redirect?to=URL` → 302 to URL; `/slow/<name>` sends
    `files[name]` after `slow_s`; anything else 404. The first `unavailable[name]` GETs of
    `/<name>` answer 503 (`server.gets[name]` counts every GET)."""
    unavailable = dict(unavailable or {})
    gets: tp.Dict[str, int] = {}

    class Songs(_Quiet):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            asked = path.lstrip("/")
            gets[asked] = gets.get(asked, 0) + 1
            if unavailable.get(asked, 0) > 0:
                unavailable[asked] -= 1
                self.send_error(503)
                return
            if path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query.removeprefix("to="))
                self.end_headers()
                return
            name = path.removeprefix("/slow/").lstrip("/")
            if name not in files:
                self.send_error(404)
                return
            if path.startswith("/slow/"):
                time.sleep(slow_s)
            body = files[name]
            self.send_response(200)
            self.send_header("Content-Type", "audio/mpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = Server(Songs)
    server.gets = gets
    return server


class Receiver:
    """A webhook receiver: every POST recorded as `(monotonic time, path, headers, body)`;
    the first `failures[path]` POSTs to a path answered 500, the rest 204."""

    def __init__(self, failures: tp.Optional[tp.Dict[str, int]] = None):
        self.calls: tp.List[tp.Tuple[float, str, dict, bytes]] = []
        self.failures = failures or {}
        self.lock = threading.Lock()
        receiver = self

        class Hooks(_Quiet):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.calls.append((time.monotonic(), self.path, dict(self.headers),
                                           body))
                    made = sum(call[1] == self.path for call in receiver.calls)
                    fail = made <= receiver.failures.get(self.path, 0)
                self.send_response(500 if fail else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = Server(Hooks)
        self.url = self.server.url

    def calls_to(self, path: str) -> tp.List[tp.Tuple[float, str, dict, bytes]]:
        with self.lock:
            return [call for call in self.calls if call[1] == path]

    def wait_for(self, path: str, count: int, timeout: float = 60.
                 ) -> tp.List[tp.Tuple[float, str, dict, bytes]]:
        """The calls to `path` once there are `count` of them (AssertionError after
        `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            calls = self.calls_to(path)
            if len(calls) >= count:
                return calls
            time.sleep(0.1)
        raise AssertionError(f"{len(self.calls_to(path))} calls to {path}, not {count}")

    def close(self) -> None:
        self.server.close()


class LosingProxy:
    """A reverse proxy to `upstream` that loses the answers to the first `lose` POSTs: it
    sends each on, keeps what came back (`lost`: `(status, body)`), and closes the client's
    connection without a word, as a network that dropped the answer; and cuts the first
    `cut` answers to a GET of a path ending in `cut_suffix` half-way through their body
    (`ranges`: the Range header of each such GET); answers the first `bad_gateway` GETs of a
    job's status (`/jobs/<id>`) itself, 502 with an HTML page, as a load balancer does while
    the service behind it is replaced (`bad_gateways`: their paths). Everything else it
    relays."""

    def __init__(self, upstream: str, lose: int = 1, cut: int = 0,
                 cut_suffix: str = "/result", bad_gateway: int = 0):
        import re

        import requests
        self.lost: tp.List[tp.Tuple[int, bytes]] = []
        self.ranges: tp.List[tp.Optional[str]] = []
        self.bad_gateways: tp.List[str] = []
        proxy = self

        class Relay(_Quiet):
            def _bad_gateway(self) -> None:
                proxy.bad_gateways.append(self.path)
                page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                self.send_response(502)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def _relay(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if (method == "GET" and re.fullmatch(r"/jobs/[^/?]+", self.path)
                        and len(proxy.bad_gateways) < bad_gateway):
                    return self._bad_gateway()
                headers = {name: value for name, value in self.headers.items()
                           if name.lower() not in ("host", "content-length", "connection")}
                answer = requests.request(method, upstream + self.path, data=body,
                                          headers=headers, timeout=120)
                if method == "POST" and len(proxy.lost) < lose:
                    proxy.lost.append((answer.status_code, answer.content))
                    self.close_connection = True
                    return
                body = answer.content
                if method == "GET" and self.path.endswith(cut_suffix):
                    proxy.ranges.append(self.headers.get("Range"))
                    if len(proxy.ranges) <= cut:
                        body = body[:len(body) // 2]  # sent under the whole one's length
                        self.close_connection = True
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding",
                                            "connection", "content-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._relay("GET")

            def do_POST(self) -> None:
                self._relay("POST")

        self.server = Server(Relay)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()
