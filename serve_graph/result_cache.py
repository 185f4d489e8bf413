"""Results kept and answered again: the same audio bytes, model and options give the same
stems, so a request that matches a kept result is answered from this node's disk without
running the model (`X-Cache: hit`).

One file per result in a folder shared by the Ingress replicas of a node: `<key[:2]>/<key>`,
holding an 8-byte length, the answer's headers as JSON, then its body; written to a temporary
name and renamed, so a reader sees a whole entry or none. A hit touches its file, and a write
past `max_bytes` removes the least recently used files first. An entry older than `max_age_s`
(from its writing; hits do not extend it) is never answered and is removed by the owner's
periodic `evict` (the Ingress' health check). The key is a SHA-256 of the
audio's own hash, the options, the model's facts (name, precision, device kind) and a scope:
the API key's id unless results are shared across keys. A model's weights replaced under the
same name are not seen: clear the folder then. A job's entry is removed from every node's
folder when the job is deleted (`remove_everywhere`, called by the job store).
"""
import functools
import hashlib
import json
import os
import struct
import time
import typing as tp
import uuid
from pathlib import Path

HEADER = struct.Struct("<Q")
WRITTEN = "_written_at"  # beside the headers in an entry's JSON: when it was written (epoch s)
MODEL_FACTS = ("model", "precision", "sources", "models_in_bag")


def cache_key(data: bytes, options: dict, model: dict, scope: str = "") -> str:
    """The key of a result: `data`'s SHA-256 with the options, the model's facts (`info` of
    Separate: name, precision, device kind, sources) and `scope`, never the file's name."""
    facts = {name: model.get(name) for name in MODEL_FACTS}
    facts["device"] = str(model.get("device", "")).split(":")[0]
    return content_digest(data, {"options": options, "model": facts, "scope": scope})


def content_digest(data: bytes, described: dict) -> str:
    """SHA-256 of `data`'s SHA-256 and `described` (JSON, keys sorted): what a request is made
    of, its song's bytes and what is said of them (a cache key, a job's fingerprint)."""
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(hashlib.sha256(data).digest() + text.encode()).hexdigest()


def cache_folder(configured: tp.Optional[str]) -> str:
    """This node's cache folder: `result_cache_dir` when set (`configured`), else a folder in
    the Ray session's directory (every Ingress replica of the node shares it)."""
    if configured is not None:
        return configured
    from ray._private import worker
    return f"{worker.global_worker.node.get_session_dir_path()}/serve_graph_results"


def entry_path(folder: tp.Union[str, Path], key: str) -> Path:
    """Where `key`'s entry lives in `folder`; ValueError for what is not a key."""
    if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key: {key!r}")
    return Path(folder) / key[:2] / key


def remove_here(configured: tp.Optional[str], key: str) -> bool:
    """Remove `key`'s entry from this node's cache folder; false when it held none."""
    try:
        entry_path(cache_folder(configured), key).unlink()
        return True
    except FileNotFoundError:
        return False


def remove_everywhere(configured: tp.Optional[str], key: str) -> list:
    """Remove `key`'s entry from the cache of every live node of the Ray cluster (each node
    keeps its own): a task pinned to each node. Returns their refs (`remove_here`'s answers);
    the job store sends them and does not wait."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return [_remover().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node["NodeID"], soft=False)).remote(configured, key)
            for node in ray.nodes() if node["Alive"]]


@functools.lru_cache(maxsize=None)
def _remover():
    import ray
    return ray.remote(num_cpus=0, max_retries=0)(remove_here)


class ResultCache:
    """Results in `folder`, at most `max_bytes` of them, each answered for `max_age_s` after
    it was written (0: no limit); an entry over half of `max_bytes` is not kept."""

    def __init__(self, folder: tp.Union[str, Path], max_bytes: int, max_age_s: float = 0.):
        self.folder, self.max_bytes, self.max_age_s = Path(folder), max_bytes, max_age_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self._next_sweep = 0.  # `sweep_due`

    def sweep_due(self) -> bool:
        """Whether the owner's periodic `evict` (the Ingress' health check) is due: a quarter
        of `max_age_s` after the last, at most a minute; when it is, the next is counted
        from now."""
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + min(60., self.max_age_s / 4 if self.max_age_s else 60.)
        return True

    def _path(self, key: str) -> Path:
        return entry_path(self.folder, key)

    def get(self, key: str) -> tp.Optional[tp.Tuple[bytes, dict]]:
        """The body and headers kept under `key` (now the most recently used), or None (an
        expired entry is removed)."""
        path = self._path(key)
        try:
            with open(path, "rb") as file:
                headers = _read_meta(file)
                body = file.read()
            if self._expired(headers.pop(WRITTEN, None)):
                path.unlink(missing_ok=True)
                return None
            os.utime(path)
        except (OSError, ValueError, struct.error):
            return None  # absent, evicted meanwhile, or not a whole entry
        return body, headers

    def put(self, key: str, body: bytes, headers: dict) -> bool:
        """Keep `body` and `headers` under `key`, then evict down to `max_bytes` (expired
        entries are left to the periodic `evict`); false when the entry is too large to keep."""
        meta = json.dumps({**headers, WRITTEN: time.time()}).encode()
        if HEADER.size + len(meta) + len(body) > self.max_bytes // 2:
            return False
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        temporary = path.with_name(f".{key}.{uuid.uuid4().hex}.partial")
        with open(temporary, "wb") as file:
            file.write(HEADER.pack(len(meta)) + meta)
            file.write(body)
        os.replace(temporary, path)
        self.evict(expired=False)  # the size alone: no entry's header read on a request's path
        return True

    def _expired(self, written: tp.Optional[float]) -> bool:
        """Whether an entry written at `written` (None: before entries said when) is past
        `max_age_s`."""
        return bool(self.max_age_s) and (written is None or
                                         time.time() - written > self.max_age_s)

    def _expired_entry(self, last_used: float, path: Path) -> bool:
        """Whether the entry at `path` is past `max_age_s`: at once when it was last used
        before that (it was written before it was used), else from its own header."""
        if not self.max_age_s:
            return False
        if time.time() - last_used > self.max_age_s:
            return True
        try:
            with open(path, "rb") as file:
                return self._expired(_read_meta(file).get(WRITTEN))
        except (OSError, ValueError, struct.error):
            return False  # removed meanwhile, or being replaced

    def entries(self) -> tp.List[tp.Tuple[float, int, Path]]:
        """`(last used, bytes, path)` of every whole entry."""
        found = []
        for path in self.folder.glob("??/*"):
            if path.name.startswith("."):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return found

    def evict(self, expired: bool = True) -> int:
        """Remove the entries past `max_age_s` (with `expired`), the least recently used until
        the rest fit `max_bytes`, and temporary files a dead writer left over an hour ago; the
        bytes removed."""
        for stale in self.folder.glob("??/.*.partial"):
            try:
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink()
            except OSError:
                pass
        entries = sorted(self.entries())
        total, removed = sum(size for _, size, _ in entries), 0
        for last_used, size, path in entries:
            if total - removed <= self.max_bytes and not (
                    expired and self._expired_entry(last_used, path)):
                continue
            try:
                path.unlink()
                removed += size
            except OSError:
                pass  # another replica evicted it
        return removed

    def bytes_used(self) -> int:
        return sum(size for _, size, _ in self.entries())


def _read_meta(file: tp.BinaryIO) -> dict:
    """An entry's JSON (its headers, and `WRITTEN`), the file left at its body."""
    size, = HEADER.unpack(file.read(HEADER.size))
    return json.loads(file.read(size))
