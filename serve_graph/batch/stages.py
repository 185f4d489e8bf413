"""The steps of the batch pipeline, as Ray Data runs them (`pipeline.build`), one row per song:

1. `decode_song` (CPU tasks): a row `{song_id, uri}` -> the song decoded to float32 PCM at the
   model's rate (`pcm`: bytes of `[C, T]`), or its error;
2. `SeparateSongs` (an actor pool, one model per actor): several decoded songs per call, their
   windows batched across songs (`engine.song_batches`), the stems encoded on threads beside the
   model and written to OUTPUT (`output.BatchOutput`); out comes each song's small row, also
   committed as its record.

A song's error (unreadable, not audio, too long...) becomes its row, with the code and detail
`POST /separate` would answer; the batch goes on.
"""
import functools
import logging
import threading
import time
import typing as tp
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from .. import url_fetch
from ..engine.errors import SeparationError, UploadTooLargeError
from ..engine.modes import RunnerOptions
from ..engine.options import SeparationOptions
from ..url_fetch import UrlFetchError, UrlRefusedError
from .output import BatchOutput

logger = logging.getLogger(__name__)


class UnreadableError(SeparationError):
    """The song's URI cannot be read (missing, no permission, over the size limit)."""
    status_code = 400
    error = "unreadable"


class UnwritableError(SeparationError):
    """The song's stems cannot be written to OUTPUT (a file where its folder would go); when
    OUTPUT refuses every write, the run stops instead (`output.OutputUnwritableError`)."""
    status_code = 507
    error = "storage_full"


# a job's model runner unless the command says otherwise: the CPU, 8 windows per forward
DEFAULT_RUNNER = RunnerOptions("cpu", max_batch=8)


@dataclass(frozen=True)
class BatchSettings:
    """What the pipeline's steps need besides the options (frozen: sent to every worker)."""
    output: str  # OUTPUT's URL
    model: str
    model_repo: tp.Optional[str]
    samplerate: int
    channels: int
    max_seconds: float
    max_file_bytes: int
    runner: RunnerOptions = DEFAULT_RUNNER  # max_batch: windows per forward
    encode_threads: int = 2
    url_allow_networks: tp.Tuple[str, ...] = ()  # private networks a song's URL may reach


def error_fields(exc: Exception, uri: str) -> dict:
    """A song's error as its row holds it: the API's code, status and detail."""
    if isinstance(exc, SeparationError):
        return {"error": exc.error, "status_code": exc.status_code, "detail": exc.detail}
    logger.error("song %s failed", uri, exc_info=exc)
    return {"error": "internal_error", "status_code": 500,
            "detail": f"{type(exc).__name__}: {exc}"[:500]}


def decode_song(row: dict, settings: BatchSettings) -> dict:
    """Step 1: a row `{song_id, uri}` -> `{song_id, uri, pcm, channels, decode_seconds}`
    (`pcm` empty and the error fields set when it cannot be read or decoded)."""
    from ..engine.audio import decode
    start = time.perf_counter()
    out = {"song_id": row["song_id"], "uri": row["uri"], "pcm": b"",
           "channels": settings.channels, "error": None, "status_code": None, "detail": None}
    try:
        wav = decode(read_song(row["uri"], settings.max_file_bytes,
                               settings.url_allow_networks),
                     settings.samplerate, settings.channels, settings.max_seconds)
        out["pcm"] = wav.tobytes()
    except Exception as exc:  # noqa: BLE001 - the song's row says why; the batch goes on
        out.update(error_fields(exc, row["uri"]))
    out["decode_seconds"] = time.perf_counter() - start
    return out


READ_ATTEMPTS = 3  # of a remote song: a 503, a connection reset or a timeout may pass
READ_BACKOFF_S = 1.  # before the second attempt, doubled before each after it
URL_TIMEOUT_S = 120.  # an http(s) song downloaded within this (the service's url_timeout_s)
GONE = frozenset({400, 401, 403, 404, 405, 410, 414, 451})  # answers no second attempt changes


def read_song(uri: str, max_bytes: int, allow: tp.Sequence[str] = (),
              attempts: int = READ_ATTEMPTS) -> bytes:
    """The file's bytes; `UnreadableError` when missing, unreadable or over `max_bytes`. An
    http(s) URL is fetched as the service fetches an `audio_url` (`url_fetch`: no private,
    loopback or link-local address, each redirect checked, unless in the `allow` networks;
    its errors `url_refused`, `url_fetch_failed`, `upload_too_large`). A remote file is read
    up to `attempts` times, backing off, a local one once: in a week-long run over a bucket,
    a request that failed once is no song's fault."""
    read, remote = reader(uri, max_bytes, allow)
    for attempt in range(max(1, attempts) if remote else 1):
        if attempt:
            time.sleep(READ_BACKOFF_S * 2 ** (attempt - 1))
        try:
            return read()
        except (UnreadableError, UrlRefusedError, UploadTooLargeError):
            raise  # no second attempt answers otherwise
        except UrlFetchError as exc:
            if exc.http_status in GONE:
                raise
            failure: SeparationError = exc
        except Exception as exc:  # noqa: BLE001 - the filesystem's, as its library raises them
            failure = UnreadableError(f"cannot read {uri}: {first_cause(exc)}")
    raise failure


def reader(uri: str, max_bytes: int, allow: tp.Sequence[str]
           ) -> tp.Tuple[tp.Callable[[], bytes], bool]:
    """What reads `uri` (`url_fetch` for http(s), else its fsspec filesystem), and whether it
    is remote (a local file is read once)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    if urlsplit(uri).scheme in ("http", "https"):
        return functools.partial(url_fetch.fetch, uri, max_bytes, URL_TIMEOUT_S,
                                 url_fetch.networks(allow)), True
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:  # an unknown protocol, or its package missing
        raise UnreadableError(f"cannot read {uri}: {exc}") from None
    return (functools.partial(read_whole, fs, path, max_bytes),
            not isinstance(fs, LocalFileSystem))


def read_whole(fs, path: str, max_bytes: int) -> bytes:
    """`path`'s bytes on `fs`, refused (`UnreadableError`) over `max_bytes`."""
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise UnreadableError(f"the file is {size / 2**20:.0f} MB, over the limit of "
                              f"{max_bytes / 2**20:.0f} MB (--max-file-mb)")
    return fs.cat_file(path)


def first_cause(exc: BaseException) -> str:
    """What went wrong first under `exc` (fsspec's HTTP filesystem raises FileNotFoundError
    from a 503 or a refused connection): its OS message, or its text."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class SeparateSongs:
    """Step 2, one model per actor: a batch of decoded rows (numpy columns) -> their rows, each
    song's files written and its record committed as it finishes."""

    def __init__(self, settings: BatchSettings, options: dict):
        from ..engine import cpu_settings
        on_cpu = settings.runner.device == "cpu"
        if on_cpu:  # chosen on this actor's machine, as Separate does; the glibc tunables
            # came with the process (`pipeline.actor_env`)
            chosen, described = cpu_settings.prepare(settings.runner.precision)
            logger.info(cpu_settings.summary(described))
        from ..engine import ModelRunner, load_model
        if on_cpu:
            cpu_settings.apply_to_torch(chosen)
        self.settings = settings
        self.options = SeparationOptions(**options)
        self.runner = ModelRunner(load_model(settings.model, settings.model_repo),
                                  options=settings.runner)
        self.pool = ThreadPoolExecutor(settings.encode_threads)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="write")  # files, then record
        self._counting, self._counted = threading.Lock(), 0.  # `_model_seconds`
        self.output = BatchOutput(settings.output)

    def __call__(self, batch: tp.Dict[str, np.ndarray]) -> tp.Iterator[tp.Any]:
        """Yields each song's row (a one-row frame) once its files and record are written,
        in the batch's order of finishing: the writing runs on a thread of its own, beside
        the next songs' windows."""
        rows = [{key: batch[key][i] for key in batch} for i in range(len(batch["song_id"]))]
        results = [self._row(row) for row in rows]
        songs, started = self._songs(rows, results), time.perf_counter()
        commits = deque(self.writer.submit(self._commit, result, {})
                        for result in results if result["status"] == "failed")
        for commit in self._separate(songs, results, started):
            commits.append(commit)
            while commits and commits[0].done():
                yield frame(commits.popleft().result())
        while commits:
            yield frame(commits.popleft().result())

    def _commit(self, result: dict, files: tp.Dict[str, bytes]) -> dict:
        """A song's files written, then its record (the song's commit); its row."""
        if files:
            try:
                result["stems"] = self.output.write_song(result["song_id"], files)
            except OSError as exc:
                result.update(status="failed", stems=[], **error_fields(UnwritableError(
                                  f"cannot write its stems: {exc.strerror or exc}"),
                                  result["uri"]))
        self.output.record(result)
        return result

    def _model_seconds(self) -> float:
        """The model's forward seconds since the last song of this actor (any call) ended:
        what a song's row counts, so that the rows sum to the actor's time in forwards."""
        with self._counting:
            seconds, self._counted = (self.runner.busy_seconds - self._counted,
                                      self.runner.busy_seconds)
        return seconds

    def _row(self, decoded: dict) -> dict:
        """The row a song will have; its error set already when it did not decode."""
        failed = isinstance(decoded["error"], str)  # numpy columns hold None, or NaN
        return {"song_id": str(decoded["song_id"]), "uri": str(decoded["uri"]),
                "status": "failed" if failed else "done",
                "error": decoded["error"] if failed else None,
                "status_code": int(decoded["status_code"]) if failed else None,
                "detail": decoded["detail"] if failed else None, "model": self.settings.model,
                "audio_seconds": None, "stems": [],
                "decode_seconds": float(decoded["decode_seconds"]),
                "separate_seconds": None, "model_seconds": None, "finished_at": None}

    def _songs(self, rows: tp.List[dict], results: tp.List[dict]) -> tp.Dict[int, tp.Any]:
        """The decoded songs of the batch, planned, by their index in it."""
        from ..engine.pipeline import plan_song
        songs = {}
        for index, (row, result) in enumerate(zip(rows, results)):
            if result["status"] == "failed":
                continue
            pcm = np.frombuffer(row["pcm"], dtype=np.float32)  # read-only: only read
            wav = pcm.reshape(int(row["channels"]), -1)
            try:
                songs[index] = plan_song(wav, self.runner.geometry, self.options)
            except SeparationError as exc:
                result.update(status="failed", **error_fields(exc, result["uri"]))
                continue
            result["audio_seconds"] = songs[index].seconds
        return songs

    def _separate(self, songs: tp.Dict[int, tp.Any], results: tp.List[dict],
                  started: float) -> tp.Iterator[Future]:
        """The songs through the model together; yields each one's commit (`_commit`), queued
        on the writer as the song ends (or fails)."""
        from ..engine.song_batches import separate_songs
        if not songs:
            return
        indices = list(songs)
        try:
            for position, files in separate_songs(
                    self.runner, [songs[i] for i in indices], self.options, self.pool,
                    self.settings.encode_threads, self.settings.runner.max_batch):
                result = results[indices[position]]
                result.update(separate_seconds=time.perf_counter() - started,
                              model_seconds=self._model_seconds(), finished_at=time.time())
                yield self.writer.submit(self._commit, result, files)
        except Exception as exc:  # noqa: BLE001 - the songs not finished fail, the batch goes on
            for index in indices:
                if results[index]["finished_at"] is None:
                    results[index].update(status="failed",
                                          **error_fields(exc, results[index]["uri"]))
                    yield self.writer.submit(self._commit, results[index], {})


def frame(row: dict) -> tp.Any:
    """One song's row as the one-row frame a call yields."""
    import pandas as pd
    return pd.DataFrame([row])
