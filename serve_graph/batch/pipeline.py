"""A batch run: INPUT's songs not yet done, through a streaming Ray Data pipeline, into OUTPUT.

```
from_items(songs to run)             one small row per song {song_id, uri}
  .map(decode_song, TaskPoolStrategy)  CPU tasks: read + decode, float32 PCM (or the error)
  .map_batches(SeparateSongs,         the model actors: `songs_per_call` songs a call, windows
     ActorPoolStrategy)               batched across them, stems encoded and written beside
  .iter_rows()                        the driver: progress, then the manifest
```
Rows stay one per song from end to end (no `groupby` of windows: Ray Data would shuffle the
whole dataset before the first group came out), so memory is bounded by the songs in flight,
not by the catalogue. A song's record is committed by its actor after its files: a run that is
killed and started again runs only what has no record (`--retry-failed`: and what failed).
"""
import signal
import threading
import typing as tp
from dataclasses import dataclass, replace

from ..engine.modes import RunnerOptions
from ..engine.options import SeparationOptions
from .output import BatchOutput, OutputUnwritableError
from .progress import Progress
from .songs import BatchInputError, SongRef, list_songs
from .stages import BatchSettings, SeparateSongs, decode_song

MAX_FILE_MB = 1024.
BATCH_WINDOWS = {"cuda": 8, "cpu": 1}  # windows per forward by device, where not given
MAX_SECONDS = 3600.  # an hour of stereo float32 PCM is 1.3 GB, within one Arrow binary value


@dataclass(frozen=True)
class BatchJob:
    """One `python -m serve_graph batch` command.

    - `source`, `output`: INPUT (`songs.list_songs`) and OUTPUT (`output.BatchOutput`) URLs;
    - `options`: the separation's, as for `POST /separate` (model set);
    - `runner`: how each model actor runs its model (compile: each actor captures or compiles
      at its start); its device None: cuda where the Ray cluster has GPUs, else cpu
      (`on_cluster`: the driver, on a cluster's head node, may have no GPU of its own);
    - `batch_size`: windows per forward (None: `BATCH_WINDOWS` of the device);
    - `actors`: model actors (default: one per GPU on CUDA, else 1); `songs_per_call`: decoded
      songs each actor call takes (their windows share forwards); `calls_per_actor`: calls
      an actor runs at once (the next call's songs in the actor before the last one ends);
      `decoders`: decode tasks at once (None: Ray Data's choice);
    - `retry_failed`: run again the songs whose record says failed;
    - `actor_resource`, `decode_resource`: custom Ray resources (of the nodes that have them:
      `ray start --resources`) that place the model actors and the decode tasks (None: any
      node; the actors go where the GPUs are);
    - `url_allow_networks`: the private networks an http(s) song may be fetched from (the
      service's `url_allow_networks`; none by default).
    """
    source: str
    output: str
    options: SeparationOptions
    model_repo: tp.Optional[str] = None
    runner: RunnerOptions = RunnerOptions()
    batch_size: tp.Optional[int] = None
    songs_per_call: int = 4
    actors: tp.Optional[int] = None
    calls_per_actor: int = 2
    decoders: tp.Optional[int] = None
    encode_threads: int = 2
    max_seconds: float = MAX_SECONDS
    max_file_mb: float = MAX_FILE_MB
    retry_failed: bool = False
    actor_resource: tp.Optional[str] = None
    decode_resource: tp.Optional[str] = None
    url_allow_networks: tp.Tuple[str, ...] = ()

    @property
    def cuda(self) -> bool:
        """Whether the model actors run on GPUs (once `on_cluster` chose the device)."""
        return (self.runner.device or "cpu").startswith("cuda")

    @property
    def record(self) -> dict:
        """What a rerun on the same OUTPUT must match: the options (model included)."""
        return {"options": self.options.model_dump()}


def to_run(songs: tp.Sequence[SongRef], records: tp.Dict[str, dict],
           retry_failed: bool) -> tp.List[SongRef]:
    """The songs without a record (and, with `retry_failed`, those recorded failed)."""
    return [song for song in songs if song.song_id not in records or
            (retry_failed and records[song.song_id]["status"] != "done")]


def plan(job: BatchJob, shown: int = 10) -> str:
    """What a run of `job` would do, said before a long one starts (`--dry-run`): INPUT's
    songs, those OUTPUT holds done and failed, those that would run (the first `shown`).
    Refuses what the run would refuse (INPUT, other options on OUTPUT); writes nothing and
    starts no Ray."""
    songs = list_songs(job.source)
    output = BatchOutput(job.output)
    output.check(job.record)
    records = output.records()
    statuses = [records[song.song_id]["status"] for song in songs if song.song_id in records]
    failed = statuses.count("failed")
    pending = [song.song_id for song in to_run(songs, records, job.retry_failed)]
    text = (f"dry run: {len(songs)} songs in INPUT; in OUTPUT {statuses.count('done')} done, "
            f"{failed} failed")
    if failed and not job.retry_failed:
        text += " (run again with --retry-failed)"
    text += f"; {len(pending)} to run"
    if pending:
        more = f" and {len(pending) - shown} more" if len(pending) > shown else ""
        text += f": {', '.join(pending[:shown])}{more}"
    return text


def on_cluster(job: BatchJob, resources: tp.Dict[str, float]) -> BatchJob:
    """`job` as it runs on a cluster of `resources` (`ray.cluster_resources()`): its device
    where the command left it to choose (cuda where the cluster has GPUs, else cpu) and its
    windows per forward (`batch_size`, else by device). Raises ValueError where the runner's
    options cannot run on that device (`RunnerOptions`)."""
    device = job.runner.device or ("cuda" if resources.get("GPU", 0) > 0 else "cpu")
    windows = job.batch_size or BATCH_WINDOWS["cuda" if device.startswith("cuda") else "cpu"]
    return replace(job, runner=replace(job.runner, device=device, max_batch=windows))


def settings_for(job: BatchJob, samplerate: int, channels: int) -> BatchSettings:
    return BatchSettings(job.output, job.options.model, job.model_repo, samplerate, channels,
                         job.max_seconds, int(job.max_file_mb * 2**20), job.runner,
                         job.encode_threads, job.url_allow_networks)


def actor_count(job: BatchJob, resources: tp.Dict[str, float]) -> int:
    """The model actors: `job.actors`, else one per GPU of the cluster on CUDA, else 1."""
    return job.actors or (max(1, int(resources.get("GPU", 0))) if job.cuda else 1)


def build(songs: tp.Sequence[SongRef], job: BatchJob, settings: BatchSettings,
          resources: tp.Dict[str, float]):
    """The Ray Data dataset of the songs' rows (lazy: iterating it runs the pipeline) on a
    cluster of `resources` (`ray.cluster_resources()`)."""
    import ray.data
    actors = actor_count(job, resources)
    cpus = resources.get("CPU", 0)
    if actors + 1 > cpus:  # decoding would wait forever for a CPU the actors hold
        raise BatchInputError(f"{actors} model actor(s) take a CPU each and decoding needs one "
                              f"more; this Ray cluster has {cpus:g} CPUs: use fewer --actors")
    for resource in filter(None, (job.actor_resource, job.decode_resource)):
        if resource not in resources:  # nothing would ever run
            raise BatchInputError(f"no node of this Ray cluster has the resource {resource!r}; "
                                  f"it has {sorted(resources)}")
    rows = ray.data.from_items([song._asdict() for song in songs],
                               override_num_blocks=min(len(songs), 1000))
    # decoding SPREAD over every node, the actors placed by DEFAULT: remote arguments that
    # differ, so that Ray Data does not fuse decoding into the model actors (it would wait
    # there for the model, and the model for it)
    decoded = rows.map(decode_song, fn_kwargs={"settings": settings}, num_cpus=1,
                       scheduling_strategy="SPREAD", **on_nodes_with(job.decode_resource),
                       compute=ray.data.TaskPoolStrategy(size=job.decoders)
                       if job.decoders else None)
    return decoded.map_batches(
        SeparateSongs, fn_constructor_args=(settings, job.options.model_dump()),
        batch_size=job.songs_per_call, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2,
                                           max_concurrent_calls_per_actor=job.calls_per_actor),
        num_gpus=1 if job.cuda else 0, num_cpus=1, scheduling_strategy="DEFAULT",
        runtime_env={"env_vars": actor_env(job)}, **on_nodes_with(job.actor_resource))


# OpenMP's threads sleep between parallel regions instead of spinning on the cores where
# decoding and the actor's own overlap-add and encoding run (serve_config.yaml's Separate too)
SHARED_CORES_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def actor_env(job: BatchJob) -> tp.Dict[str, str]:
    """What a model actor's process must start with: on the CPU, the CPU settings' glibc
    tunables (memory kept, one arena: `engine.cpu_settings`; the model runs on one of the
    actor's threads) and OpenMP's passive wait (unless forced otherwise), as
    serve_config.yaml gives Separate's replicas."""
    if job.cuda:
        return {}
    from ..engine import cpu_settings
    return {**SHARED_CORES_ENV, **cpu_settings.choose(job.runner.precision).process_env()}


def on_nodes_with(resource: tp.Optional[str]) -> dict:
    """Ray's remote arguments that keep a task or actor on the nodes with `resource` (a
    sliver of it, so that the resource never limits how many run there)."""
    return {"resources": {resource: 0.001}} if resource else {}


class Terminated(KeyboardInterrupt):
    """SIGTERM (`stop_on_sigterm`): stops the run as Ctrl-C does."""


def stop_on_sigterm() -> None:
    """From now on SIGTERM (`ray job stop`, Kubernetes) stops the run as Ctrl-C does: its Ray
    shut down, the run's record kept, exit 143. Called after Ray's start, whose own handler
    (it logs the signal and dies) it replaces; only the main thread may set one."""
    def terminated(signum, frame):
        raise Terminated()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminated)


# what stops a run: (cause, in a few words (None: the cause's own detail), exit code); the
# first that matches (Terminated is a KeyboardInterrupt); 130 and 143 as a shell says a
# signal's end
STOPS = ((Terminated, "SIGTERM", 128 + signal.SIGTERM),
         (KeyboardInterrupt, "Ctrl-C", 128 + signal.SIGINT),
         (OutputUnwritableError, None, 3))


class RunStopped(Exception):
    """The run stopped before its end: OUTPUT refused writes (`OutputUnwritableError`), or
    Ctrl-C / SIGTERM (`KeyboardInterrupt`). The songs recorded so far are kept: the same
    command again goes on from them. `progress`: the run's until it stopped; `exit_code`:
    3 when OUTPUT refused writes, 130 on Ctrl-C, 143 on SIGTERM."""

    def __init__(self, progress: tp.Optional[Progress], cause: BaseException):
        super().__init__(reason(cause))
        self.progress, self.cause = progress, cause
        self.exit_code = next((code for kind, _, code in STOPS if isinstance(cause, kind)), 3)


def reason(cause: BaseException) -> str:
    """Why a run stopped, in a few words."""
    said = next((words for kind, words, _ in STOPS if isinstance(cause, kind)), None)
    return said or getattr(cause, "detail", None) or str(cause)


def run(job: BatchJob, geometry: tp.Tuple[int, int],
        progress_every_s: float = 2.) -> tp.Tuple[Progress, str, tp.List[dict]]:
    """Run `job` (`geometry`: the model's sample rate and channels): its progress, the
    manifest's URL and the manifest's rows (every song of INPUT once, from the records).
    Ctrl-C, SIGTERM or OUTPUT refusing writes, while songs run or while the manifest is
    written, raise `RunStopped`."""
    songs = list_songs(job.source)
    output = BatchOutput(job.output)
    output.start(job.record)
    pending = to_run(songs, output.records(), job.retry_failed)
    progress = Progress(len(songs), len(songs) - len(pending), every_s=progress_every_s)
    try:
        if pending:
            separate(pending, job, geometry, progress)
        records = output.records()
        rows = [records[song.song_id] for song in songs if song.song_id in records]
        manifest = output.write_manifest(rows)
        output.record_run(progress.record())
    except (KeyboardInterrupt, OutputUnwritableError) as exc:
        raise stopped(exc, output, progress) from None
    return progress, manifest, rows


def separate(pending: tp.Sequence[SongRef], job: BatchJob, geometry: tp.Tuple[int, int],
             progress: Progress) -> None:
    """The pipeline over the `pending` songs on this process' Ray (started now), each song's
    row counted by `progress` as it reaches the driver."""
    import ray
    start_ray()
    stop_on_sigterm()
    resources = ray.cluster_resources()
    try:
        job = on_cluster(job, resources)
    except ValueError as exc:  # e.g. --dconv triton where the cluster has no GPU
        raise BatchInputError(str(exc)) from None
    progress.pipeline_started(actor_count(job, resources), job.runner.device,
                              job.runner.max_batch)
    for row in build(pending, job, settings_for(job, *geometry), resources).iter_rows():
        progress.song(row)


def stopped(cause: BaseException, output: BatchOutput, progress: Progress) -> RunStopped:
    """The pipeline stopped by `cause`: OUTPUT refused writes in a model actor (Ray Data
    raises it as the actor raised it: `start_ray`), or Ctrl-C / SIGTERM. The run's record is
    kept where OUTPUT still takes it; the manifest is left as the last full run wrote it."""
    try:
        output.record_run({**progress.record(), "stopped": reason(cause)})
    except OutputUnwritableError:
        pass  # the songs' records are what a rerun needs
    return RunStopped(progress, cause)


# Ray Data's largest block, bytes: a task's output goes on in blocks of at least this size
# (or when the task ends), so at its default (128 MB) the small rows of a model actor's call
# reached the driver together when the call ended, and the progress of a CPU run with the
# full model stood still for many minutes; at 1 each song's row, and each decoded song, is a
# block of its own, which reaches the driver when the call yields the next song's
ROW_BLOCK_BYTES = 1


def start_ray() -> None:
    """This process's Ray: the cluster at RAY_ADDRESS (`ray job submit` sets it), else a new
    local one without the dashboard (`serve_run.init_ray`); Ray Data's own progress bars off
    (the batch prints its own), each row a block (`ROW_BLOCK_BYTES`)."""
    import ray
    import ray.data

    from ..serve_run import init_ray
    if not ray.is_initialized():
        init_ray(include_dashboard=False, logging_level="WARNING")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.target_max_block_size = ROW_BLOCK_BYTES
    # a model actor's `OutputUnwritableError` reaches the driver as itself (an instance of
    # it), not as a UserCodeException whose cause is lost on the way
    context.raise_original_map_exception = True
