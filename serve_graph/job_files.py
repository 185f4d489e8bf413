"""Where jobs keep their bytes and their records: a folder, or a bucket through fsspec.

`job_storage` in serve_config.yaml's `args` is a local path or an fsspec URL
(`s3://bucket/prefix`, `gs://...`, with the matching fsspec package installed: s3fs, gcsfs).
Unset, it is a folder in the Ray session's directory: it outlives a killed `JobStore` actor or
Ingress replica, not a restart of the service. Under the root:

    records/<id>.json   a job's record, rewritten on each change of status
    uploads/<id>        the song as uploaded, from the 202 until the job ends
    results/<id>        the ZIP of a finished job, until it expires
    store.json          the id of the `JobStore` that owns the root (checked by each replica)

A write is whole or absent: a local file is written beside its name, synced and renamed; an
object store puts whole objects. The bytes never sit in an actor's heap: uploads are written
by the Ingress replica that took them, results by the one that ran the job.
"""
import json
import os
import typing as tp
import uuid

import fsspec

KINDS = ("records", "uploads", "results")
CHUNK = 1 << 20  # bytes per read when a result is streamed to a client


class JobFiles:
    """The files of the jobs under `root` (a path or an fsspec URL)."""

    def __init__(self, root: str):
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.local = "file" in _protocols(self.fs)
        for kind in KINDS:
            self.fs.makedirs(self._path(kind), exist_ok=True)

    def _path(self, kind: str, name: str = "") -> str:
        return "/".join(part for part in (self.root.rstrip("/"), kind, name) if part)

    def write(self, kind: str, name: str, data: tp.Union[bytes, memoryview]) -> int:
        """Store `data` as `kind/name`, whole or not at all; returns its size in bytes."""
        path = self._path(kind, name)
        if not self.local:
            self.fs.pipe_file(path, bytes(data))
            return len(data)
        partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        return len(data)

    def read(self, kind: str, name: str) -> tp.Optional[bytes]:
        """`kind/name`'s bytes, None when it is not there."""
        try:
            return self.fs.cat_file(self._path(kind, name))
        except FileNotFoundError:
            return None

    def open(self, kind: str, name: str):
        """`kind/name` open for reading (a deletion meanwhile does not cut a local read short),
        or None when it is not there."""
        try:
            return self.fs.open(self._path(kind, name), "rb")
        except FileNotFoundError:
            return None

    def delete(self, kind: str, name: str) -> None:
        try:
            self.fs.rm_file(self._path(kind, name))
        except FileNotFoundError:
            pass

    def names(self, kind: str) -> tp.List[str]:
        """The names stored under `kind` (partial writes left out)."""
        found = self.fs.ls(self._path(kind), detail=False)
        names = [path.rstrip("/").rsplit("/", 1)[-1] for path in found]
        return sorted(name for name in names if ".partial-" not in name)

    def write_json(self, kind: str, name: str, value: dict) -> None:
        self.write(kind, name, json.dumps(value).encode())

    def read_json(self, kind: str, name: str) -> tp.Optional[dict]:
        data = self.read(kind, name)
        return None if data is None else json.loads(data)

    def claim_root(self, owner: str) -> None:
        """Mark the root as `owner`'s (a `JobStore`), for `shared_with` to check."""
        self.fs.pipe_file(self._path("store.json"), json.dumps({"store": owner}).encode())

    def shared_with(self, owner: str) -> bool:
        """Whether this root, as seen from here, is the one `owner` writes to: false where a
        local folder on another node is not the store's (a cluster needs shared storage)."""
        try:
            return json.loads(self.fs.cat_file(self._path("store.json")))["store"] == owner
        except (FileNotFoundError, ValueError, KeyError):
            return False


def _protocols(fs) -> tp.Tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
