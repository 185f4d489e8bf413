"""OUTPUT of a batch: the stems, one record per song, and the manifest.

```
OUTPUT/<song_id>/<stem>.<format>   the song's files, each written whole (temp + rename)
OUTPUT/manifest.parquet            one row per song of INPUT (rewritten at the end of a run)
OUTPUT/_batch/job.json             the options and model the batch runs with
OUTPUT/_batch/rows/<key>.json      one song's record: written after its files, so it is the
                                   song's commit; a rerun skips the songs recorded done
OUTPUT/_batch/runs/<start>.json    one record per run of the command: when it started, how
                                   long Ray's start and the whole run took, songs done
OUTPUT/_batch/tmp/                 files being written (cleared when a run starts)
```
Any fsspec URL works as OUTPUT (`s3://bucket/stems`); a local folder by default.
"""
import errno
import hashlib
import json
import typing as tp
import uuid

import fsspec

from ..engine.errors import SeparationError
from .songs import STATE_FOLDER, BatchInputError

# what a write answers when OUTPUT as a whole refuses writes (full, over quota, read-only, no
# permission: an object store's AccessDenied, expired credentials): no song could be written
STORAGE_WIDE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
MANIFEST = "manifest.parquet"
READ_AT_ONCE = 10_000  # records per fsspec call (in flight on an object store: up to 1280)
# the manifest's columns, in order: what a row of a song holds (`BatchOutput.record`)
COLUMNS = ("song_id", "uri", "status", "error", "status_code", "detail", "model",
           "audio_seconds", "stems", "decode_seconds", "separate_seconds", "model_seconds",
           "finished_at")


class OutputUnwritableError(SeparationError):
    """OUTPUT refuses every write (`STORAGE_WIDE`): the run stops, where going on would record
    every song after as failed; run again once OUTPUT can be written, it goes on from the
    songs recorded."""
    status_code = 507
    error = "storage_full"


class BatchOutput:
    """OUTPUT's filesystem: song files and records, written whole; safe to share between the
    driver and the model actors (each opens its own)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.state = f"{self.root}/{STATE_FOLDER}"

    def start(self, job: dict) -> None:
        """Make OUTPUT ready for a run of `job` (options and model): the first run writes
        `job.json`; a rerun must ask for the same (`BatchInputError` otherwise). Clears the
        files that a killed run left half-written."""
        self.fs.makedirs(f"{self.state}/rows", exist_ok=True)
        if not self.check(job):
            self.write(f"{STATE_FOLDER}/job.json", json.dumps(job, indent=1).encode())
        if self.fs.exists(f"{self.state}/tmp"):
            self.fs.rm(f"{self.state}/tmp", recursive=True)

    def check(self, job: dict) -> bool:
        """Whether OUTPUT holds a run of `job` (false: none yet); `BatchInputError` when it
        holds a run with other settings. Writes nothing."""
        path = f"{self.state}/job.json"
        if not self.fs.exists(path):
            return False
        before = json.loads(self.fs.cat_file(path))
        if before != job:
            changed = sorted(key for key in set(before) | set(job)
                             if before.get(key) != job.get(key))
            raise BatchInputError(
                f"{self.url} holds a batch run with other settings ({', '.join(changed)}: "
                f"{ {key: before.get(key) for key in changed} }); run it with the same "
                f"ones to resume it, or give another OUTPUT")
        return True

    def write(self, relative: str, data: bytes) -> None:
        """`OUTPUT/<relative>` holds `data`, all of it or (killed meanwhile) none: written
        under `_batch/tmp/`, then moved into place. `OutputUnwritableError` when OUTPUT refuses
        writes as a whole; other `OSError`s (a file in the way of a folder) as they come."""
        temporary = f"{self.state}/tmp/{uuid.uuid4().hex}"
        final = f"{self.root}/{relative}"
        try:
            self.fs.makedirs(f"{self.state}/tmp", exist_ok=True)
            self.fs.pipe_file(temporary, data)
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(temporary, final)
        except OSError as exc:
            if exc.errno not in STORAGE_WIDE:
                raise
            raise OutputUnwritableError(f"cannot write to {self.url}: "
                                        f"{exc.strerror or exc}") from None

    def write_song(self, song_id: str, files: tp.Dict[str, bytes]) -> tp.List[str]:
        """A song's files into `OUTPUT/<song_id>/`; their names."""
        for name, data in files.items():
            self.write(f"{song_id}/{name}", data)
        return list(files)

    def record(self, row: dict) -> None:
        """Commit one song's row (after its files)."""
        self.write(f"{STATE_FOLDER}/rows/{row_key(row['song_id'])}.json",
                   json.dumps(row).encode())

    def records(self) -> tp.Dict[str, dict]:
        """Every committed row, by song id."""
        rows = {}
        for _, data in self._read_all(f"{self.state}/rows"):
            try:
                row = json.loads(data)
            except ValueError:
                continue  # not a record of ours
            rows[row["song_id"]] = row
        return rows

    def _read_all(self, folder: str) -> tp.Iterator[tp.Tuple[str, bytes]]:
        """Every file under `folder` with its path (none when it does not exist; a file gone
        meanwhile left out), `READ_AT_ONCE` files a request of fsspec's: on an object store
        (s3fs, gcsfs: asynchronous filesystems) it fetches them many at a time, where a
        million records one after the other would take hours before a rerun could start."""
        paths = self.fs.find(folder) if self.fs.exists(folder) else []
        for start in range(0, len(paths), READ_AT_ONCE):
            read = self.fs.cat(paths[start:start + READ_AT_ONCE], on_error="return")
            for path, data in read.items():
                if isinstance(data, FileNotFoundError):
                    continue
                if isinstance(data, Exception):
                    raise data
                yield path, data

    def record_run(self, run: dict) -> None:
        """One run's record (`Progress.record`), by its start time."""
        self.write(f"{STATE_FOLDER}/runs/{run['started_at']:.3f}.json",
                   json.dumps(run).encode())

    def runs(self) -> tp.List[dict]:
        """Every run's record, the first run's first."""
        runs = sorted(self._read_all(f"{self.state}/runs"))
        return [json.loads(data) for _, data in runs]

    def write_manifest(self, rows: tp.Sequence[dict]) -> str:
        """`OUTPUT/manifest.parquet` from `rows` (sorted by song id); its URL."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq
        ordered = sorted(rows, key=lambda row: row["song_id"])
        table = pa.table({column: [row.get(column) for row in ordered] for column in COLUMNS},
                         schema=manifest_schema())
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write(MANIFEST, buffer.getvalue())
        return f"{self.url.rstrip('/')}/{MANIFEST}"


def manifest_schema():
    import pyarrow as pa
    return pa.schema([("song_id", pa.string()), ("uri", pa.string()), ("status", pa.string()),
                      ("error", pa.string()), ("status_code", pa.int32()),
                      ("detail", pa.string()), ("model", pa.string()),
                      ("audio_seconds", pa.float64()), ("stems", pa.list_(pa.string())),
                      ("decode_seconds", pa.float64()), ("separate_seconds", pa.float64()),
                      ("model_seconds", pa.float64()), ("finished_at", pa.float64())])


def row_key(song_id: str) -> str:
    """A record's file name: a digest, since ids hold slashes and any character."""
    return hashlib.sha256(song_id.encode()).hexdigest()[:32]
