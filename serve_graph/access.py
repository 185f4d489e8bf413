"""Who may use the service: optional API keys, a per-client concurrency limit, and the bytes
of uploads a replica takes in at once.

Keys come from SERVE_GRAPH_API_KEYS (comma-separated) and/or the file named by `api_keys_file`
in serve_config.yaml or SERVE_GRAPH_API_KEYS_FILE (one key per line: a Kubernetes or Modal
secret mounted as a file; read again when it changes). No key configured: the service is open.
Clients send `Authorization: Bearer <key>`; keys are compared in constant time.
"""
import hmac
import logging
import os
import time
import typing as tp
from collections import Counter
from pathlib import Path

KEYS_ENV, KEYS_FILE_ENV = "SERVE_GRAPH_API_KEYS", "SERVE_GRAPH_API_KEYS_FILE"
KEYS_CHECK_S = 5.  # how often the keys file is looked at for changes
logger = logging.getLogger("ray.serve")


class ApiKeys:
    """The configured API keys (`current`): SERVE_GRAPH_API_KEYS's, and the keys file's, read
    again when the file changes (looked at every `check_s` at most, as requests come), so that
    keys added to it or revoked from it take effect without a restart: a mounted Kubernetes or
    Modal secret is updated in place. Whether keys are `required` is settled at the start: a
    file emptied later refuses every key, and one unreadable for a moment (a secret being
    swapped) leaves the keys last read; neither opens the service."""

    def __init__(self, keys_file: tp.Optional[str] = None, check_s: float = KEYS_CHECK_S):
        self._env = [key.strip() for key in os.environ.get(KEYS_ENV, "").split(",")
                     if key.strip()]
        self._path = keys_file or os.environ.get(KEYS_FILE_ENV)
        self._check_s = check_s
        self._stamp: tp.Optional[tuple] = None
        self._from_file: tp.List[str] = []
        self._checked_at = time.monotonic()
        if self._path:
            self._read(os.stat(self._path))  # a file missing at the start: an error
        self.required = bool(self._env or self._from_file)

    def current(self) -> tp.List[str]:
        if self._path and time.monotonic() - self._checked_at >= self._check_s:
            self._checked_at = time.monotonic()
            try:
                self._read(os.stat(self._path))
            except OSError as exc:
                logger.warning("API keys file %s unreadable, its last keys kept: %s",
                               self._path, exc)
        return self._env + self._from_file

    def _read(self, stat: os.stat_result) -> None:
        """The file's keys, when `stat` says it changed since it was last read."""
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            lines = Path(self._path).read_text().splitlines()
            self._from_file = [line.strip() for line in lines if line.strip()]
            self._stamp = stamp


def bearer_token(authorization: tp.Optional[str]) -> tp.Optional[str]:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matching_key(keys: tp.Sequence[str], token: tp.Optional[str]) -> tp.Optional[str]:
    """The key equal to `token`, compared in constant time against every key; None if none."""
    found = None
    for key in keys:
        if token is not None and hmac.compare_digest(key.encode(), token.encode()):
            found = key
    return found


class ConcurrencyLimit:
    """At most `limit` requests in flight per client (0: no limit), in this replica."""

    def __init__(self, limit: int):
        self.limit = limit
        self._active: tp.Counter[str] = Counter()

    def try_enter(self, client: str) -> bool:
        if self.limit and self._active[client] >= self.limit:
            return False
        self._active[client] += 1
        return True

    def leave(self, client: str) -> None:
        self._active[client] -= 1
        if self._active[client] <= 0:
            del self._active[client]


class ByteBudget:
    """At most `limit` bytes taken at once (0: no limit), in this replica. One taking alone
    is always allowed, so an upload below the upload limit is never refused forever."""

    def __init__(self, limit: int):
        self.limit = limit
        self.taken = 0

    def try_take(self, size: int) -> bool:
        if self.limit and self.taken and self.taken + size > self.limit:
            return False
        self.taken += size
        return True

    def give_back(self, size: int) -> None:
        self.taken = max(0, self.taken - size)
