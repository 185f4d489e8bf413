"""Who may use the service: optional API keys, a per-client concurrency limit, and the bytes
of uploads a replica takes in at once.

Keys come from SERVE_GRAPH_API_KEYS (comma-separated) and/or the file named by `api_keys_file`
in serve_config.yaml or SERVE_GRAPH_API_KEYS_FILE (one key per line: a Kubernetes or Modal
secret mounted as a file). No key configured: the service is open. Clients send
`Authorization: Bearer <key>`; keys are compared in constant time.
"""
import hmac
import os
import typing as tp
from collections import Counter
from pathlib import Path

KEYS_ENV, KEYS_FILE_ENV = "SERVE_GRAPH_API_KEYS", "SERVE_GRAPH_API_KEYS_FILE"


def load_keys(keys_file: tp.Optional[str] = None) -> tp.List[str]:
    """The configured API keys (empty: no authentication)."""
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",")]
    path = keys_file or os.environ.get(KEYS_FILE_ENV)
    if path:
        keys += [line.strip() for line in Path(path).read_text().splitlines()]
    return [key for key in keys if key]


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
