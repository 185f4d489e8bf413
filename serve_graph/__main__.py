"""Command line: `python -m serve_graph separate song.mp3 -o stems.zip` (the local twin of
`POST /separate`), `python -m serve_graph batch INPUT OUTPUT` (many songs on Ray Data) and
`python -m serve_graph serve` (the Ray Serve graph)."""
import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import yaml

# light imports only: `serve` starts Ray, and the model code loads where it runs (torch and
# Demucs are imported by the commands that run the model here: separate, make-repo)
from .engine.errors import ModelNotFoundError, SeparationError
from .engine.model_files import DEFAULT_MODEL
from .engine.modes import COMPILE_MODES, DCONVS, GROUP_NORMS, PRECISIONS
from .engine.options import SeparationOptions, request_fields
from .launch import DEFAULT_CONFIG, launch, write_config
from .preflight import missing_model_message, settings_problem
from .procs import stop_tree
from .settings import MODEL_ENV, REPO_ENV

if tp.TYPE_CHECKING:
    from .batch.pipeline import BatchJob


def _separate_parser(sub) -> None:
    p = sub.add_parser("separate", help="separate one audio file into a ZIP of stems")
    p.add_argument("audio_file", type=Path)
    p.add_argument("-o", "--output", type=Path,
                   help="file to write (default, beside the input: <audio_file stem>_stems.zip, "
                   "or <stem>_remix.<format> with --remix)")
    _add_option_fields(p)
    fmt = p.add_mutually_exclusive_group()  # shorthands of --format
    fmt.add_argument("--wav", dest="format", action="store_const", const="wav",
                     help="same as --format wav")
    fmt.add_argument("--flac", dest="format", action="store_const", const="flac",
                     help="same as --format flac")
    _add_runner_arguments(p)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="print seconds per stage (load, decode, model, encode...) as JSON")


def _add_option_fields(parser) -> None:
    """One option per field of `SeparationOptions` (`--two-stems`, `--shifts`...), with its
    type, choices, default and description. Stem names are checked against the model once it
    is loaded (its sources), not here."""
    for field in request_fields():
        flag = "--" + field.name.replace("_", "-")
        if field.kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=field.default, help=field.description)
            continue
        parser.add_argument(flag, type=field.kind, default=field.default,
                            choices=field.choices, help=field.description)


def _options(args) -> SeparationOptions:
    """The request's options; `--model` left out: env SERVE_GRAPH_MODEL, else htdemucs."""
    options = SeparationOptions.parse(**{field.name: getattr(args, field.name)
                                         for field in request_fields()})
    model = options.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    return options.with_model(model, [model])


def _prepare_cpu(precision: str):
    """This machine's CPU settings, applied before torch loads (the model runs on this
    process's main thread), and their description; None, with the reason printed, when they
    are malformed."""
    from .engine import cpu_settings
    try:
        chosen, described = cpu_settings.prepare(precision)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    print(cpu_settings.summary(described), file=sys.stderr)
    return chosen, described


def _refusal(exc: Exception, model: tp.Optional[str]) -> str:
    """The one line a command prints before exiting 2 on `exc`: a missing model, a bad file
    or folder, or a refused request."""
    if isinstance(exc, ModelNotFoundError):
        return missing_model_message(model, str(exc))
    if isinstance(exc, SeparationError):
        return f"error: {exc.detail}"
    return f"error: {exc}"


REFUSED = (ModelNotFoundError, SeparationError, OSError)  # what `_refusal` says


def run_separate(args) -> int:
    try:
        options = _options(args)
    except SeparationError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    prepared = _prepare_cpu(args.precision)
    if prepared is None:
        return 2
    chosen, cpu = prepared
    from .engine import ModelRunner, load_model, separate_to_zip
    from .engine.cpu_settings import apply_to_torch, precision_problem
    from .engine.separator import timed
    runner_options = _runner_options(args, max(args.batch_size, 1))
    if runner_options is None:
        return 2
    output = args.output or args.audio_file.with_name(options.result_name(args.audio_file.stem))
    timings: dict = {}
    try:
        data = args.audio_file.read_bytes()
        start = time.perf_counter()
        with timed(timings, "load_model"):
            runner = ModelRunner(load_model(options.model, args.model_repo),
                                 options=runner_options)
        problem = precision_problem(args.precision) if runner.device.type == "cpu" else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        apply_to_torch(chosen)
        archive = separate_to_zip(data, runner, options, args.batch_size,
                                  progress=not args.no_progress, timings=timings)
    except REFUSED as exc:
        print(_refusal(exc, options.model), file=sys.stderr)
        return 2
    output.write_bytes(archive)
    print(f"wrote {output} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.profile:
        print(json.dumps({stage: round(seconds, 3) for stage, seconds in timings.items()}
                         | {"cpu_settings": cpu}))
    return 0


def _add_runner_arguments(p) -> None:
    """How the model runs (`RunnerOptions`): `separate`'s and `batch`'s."""
    p.add_argument("--model-repo", default=os.environ.get(REPO_ENV),
                   help=f"local model repo folder (env {REPO_ENV})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; "
                   "batch: if the Ray cluster has GPUs)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="graphs: CUDA graphs; compile: torch.compile (+ graphs on CUDA; its "
                   "kernels cached in TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--group-norm", default="fp32", choices=GROUP_NORMS,
                   help="half: with bf16/fp16, GroupNorm keeps half-precision activations")
    p.add_argument("--dconv", default="torch", choices=DCONVS,
                   help="triton: each DConv branch's 1x1 conv, GroupNorm, GLU and LayerScale "
                   "as fused Triton kernels (CUDA; not with --compile compile)")


def _runner_options(args, max_batch: int):
    """`RunnerOptions` of `separate`'s and `batch`'s model arguments, or None when they cannot
    run together (e.g. --dconv triton without a GPU), said in one line."""
    from .engine.modes import RunnerOptions
    try:
        return RunnerOptions(args.device, args.precision, args.compile, max_batch,
                             group_norm=args.group_norm, dconv=args.dconv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _batch_parser(sub) -> None:
    from .batch.pipeline import BATCH_WINDOWS, MAX_FILE_MB, MAX_SECONDS
    p = sub.add_parser("batch", help="separate every song of a folder, glob, list or manifest "
                       "into OUTPUT/<song_id>/<stem>.<format> on Ray Data; resumable")
    p.add_argument("input", help="a folder (recursive), a glob, a .txt list, or a .csv/.parquet "
                   "manifest with song_id and uri; local, or s3:// gs:// ... (fsspec)")
    p.add_argument("output", help="folder (or fsspec URL) for the stems and manifest.parquet")
    _add_option_fields(p)
    _add_runner_arguments(p)
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default: "
                   f"{BATCH_WINDOWS['cuda']} on CUDA, {BATCH_WINDOWS['cpu']} on CPU, as "
                   "`separate`: larger CPU batches only cost memory)")
    p.add_argument("--songs-per-call", type=int, default=4,
                   help="songs each model actor takes at once; their windows share forwards")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, or 1)")
    p.add_argument("--calls-per-actor", type=int, default=2,
                   help="calls a model actor runs at once: one's overlap-add and encoding "
                   "beside the other's forwards")
    p.add_argument("--decoders", type=int, help="decode tasks at once (default: Ray Data's)")
    p.add_argument("--encode-threads", type=int, default=2,
                   help="encoding threads beside each model actor")
    p.add_argument("--max-audio-seconds", type=float, default=MAX_SECONDS,
                   help="longer songs fail with audio_too_long")
    p.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB,
                   help="larger files fail with unreadable")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the songs an earlier run recorded as failed")
    p.add_argument("--dry-run", action="store_true",
                   help="say how many songs INPUT names, how many OUTPUT holds done and "
                   "failed, and which would run; run nothing, write nothing")
    p.add_argument("--failed-songs-ok", action="store_true",
                   help="exit 0 also when some songs failed (the manifest says which): for job "
                   "runners that retry failed jobs, such as a KubeRay RayJob")
    p.add_argument("--actor-resource", help="a custom Ray resource: the model actors run only "
                   "on the nodes that have it (default: any; on CUDA, where the GPUs are)")
    p.add_argument("--decode-resource", help="a custom Ray resource: decoding runs only on the "
                   "nodes that have it (default: spread over every node)")
    p.add_argument("--url-allow-networks", type=_networks, default=(),
                   help="comma-separated networks (10.0.0.0/8,127.0.0.1/32) an http(s) song "
                   "may be fetched from although private or loopback (the service's "
                   "url_allow_networks); by default only public addresses")


def _networks(text: str) -> tp.Tuple[str, ...]:
    """`--url-allow-networks`: its networks, checked as the fetch will parse them
    (`url_fetch.networks`; argparse says which is not one)."""
    from .url_fetch import networks
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    try:
        networks(items)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return items


def batch_runner(args):
    """The model actors' `RunnerOptions` of a `batch` command line, `--device` None where not
    given (the pipeline chooses it on the Ray cluster: `batch.pipeline.on_cluster`); None when
    they cannot run (`_runner_options`)."""
    return _runner_options(args, 1)  # windows per forward: the job's `batch_size`, else by device


def batch_job(args, options: SeparationOptions, runner) -> "BatchJob":
    """The `BatchJob` of a `batch` command line (`options` from its option fields, `runner`
    from `batch_runner`)."""
    from .batch.pipeline import BatchJob
    windows = max(1, args.batch_size) if args.batch_size else None  # None: by device
    return BatchJob(args.input, args.output, options, args.model_repo, runner, windows,
                    max(1, args.songs_per_call), args.actors, max(1, args.calls_per_actor),
                    args.decoders, max(1, args.encode_threads), args.max_audio_seconds,
                    args.max_file_mb, args.retry_failed, args.actor_resource,
                    args.decode_resource, args.url_allow_networks)


def run_batch(args) -> int:
    """Exit 0 when every song is done, 1 when some failed (their rows say why; 0 with
    --failed-songs-ok), 2 when the batch cannot start (bad INPUT, options, model or OUTPUT),
    3 when it stopped because OUTPUT refused writes (full), 130 on Ctrl-C, 143 on SIGTERM
    (`RunStopped`: the same command again goes on)."""
    from .batch.pipeline import RunStopped, plan, run
    try:
        options = _options(args)
    except SeparationError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    runner = batch_runner(args)  # what the model actors will be given, checked first
    if runner is None:
        return 2
    try:
        geometry = _model_geometry(options, args.model_repo)
        if args.dry_run:
            print(plan(batch_job(args, options, runner)), file=sys.stderr)
            return 0
        progress, manifest, rows = run(batch_job(args, options, runner), geometry)
    except RunStopped as exc:
        print(exc.progress.stopped(str(exc)), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # before the pipeline started: nothing ran
        stopped = RunStopped(None, exc)
        print(f"batch stopped ({stopped}) before any song ran", file=sys.stderr)
        return stopped.exit_code
    except REFUSED as exc:
        print(_refusal(exc, options.model), file=sys.stderr)
        return 2
    print(progress.summary(manifest), file=sys.stderr)
    return 0 if args.failed_songs_ok or all(row["status"] == "done" for row in rows) else 1


def _model_geometry(options: SeparationOptions, repo: tp.Optional[str]) -> tp.Tuple[int, int]:
    """The model's sample rate and channels, the options checked against its stems."""
    from .engine import load_model, model_geometry
    geometry = model_geometry(load_model(options.model, repo))
    options.validate_for(geometry.sources)
    return geometry.samplerate, geometry.audio_channels


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the Ray Serve graph (`serve run serve_config.yaml`)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--port", type=int, help="HTTP port (default: the config's)")
    p.add_argument("--model", help=f"model name (default: the config's, or env {MODEL_ENV})")
    p.add_argument("--model-repo", help=f"local model repo folder (or env {REPO_ENV})")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 10.  # for `serve run` to shut Serve down; then whatever is left is killed by PID


def _stop_once(signum, frame):
    """The first SIGTERM or Ctrl-C stops the service; any later one is ignored, so that it
    cannot cut the stop short and leave `serve run` and Ray's processes behind."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_serve(args) -> int:
    """`serve run` on the config, with the port and model given here; blocks until Ctrl-C or
    SIGTERM, then stops Serve and every process it started. A missing model ends it at once."""
    app_args = {key: value for key, value in
                (("model", args.model), ("model_repo", args.model_repo)) if value}
    config_args = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"]
    try:
        problem = settings_problem({**config_args, **app_args})
    except ValueError as exc:  # an arg the service does not know, or a bad value
        problem = f"error: {exc}"
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    for stop_signal in STOP_SIGNALS:  # also where SIGINT came ignored (a script's `&`)
        signal.signal(stop_signal, _stop_once)
    with tempfile.TemporaryDirectory() as folder:
        config = write_config(Path(folder) / "serve_config.yaml", args.config, port=args.port,
                              args=app_args)
        process = None
        try:
            process = launch(config, cwd=os.getcwd())  # relative model repos stay yours
            return process.wait()
        except KeyboardInterrupt:
            if process is not None:
                stop_tree(process, signal.SIGINT, grace=STOP_GRACE_S, linger=3.)
            return 0


def _make_repo_parser(sub) -> None:
    p = sub.add_parser("make-repo", help="write a model repo of random-weight htdemucs, to try "
                       "the service without the real weights (its stems are noise)")
    p.add_argument("folder", type=Path)
    p.add_argument("--name", default=DEFAULT_MODEL)
    p.add_argument("--size", default="tiny", choices=["tiny", "full", "standin"],
                   help="tiny: instant, for trying the API; full: htdemucs' real size and speed; "
                   "standin: htdemucs window geometry, a forward that costs nothing (to measure all but the model)")


def run_make_repo(args) -> int:
    from .engine import make_random_repo
    make_random_repo(args.folder, args.name, size=args.size)
    print(f"wrote model {args.name!r} ({args.size}, random weights) to {args.folder}; use it "
          f"with SERVE_GRAPH_MODEL_REPO={args.folder} or --model-repo {args.folder}",
          file=sys.stderr)
    return 0


def _kuberay_parser(sub) -> None:
    from .kuberay import ClusterSpec
    p = sub.add_parser("kuberay", help="write a KubeRay RayService manifest embedding the config "
                       "(or, with --job, a RayJob of the batch command)")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    p.add_argument("--job", nargs=2, metavar=("INPUT", "OUTPUT"),
                   help="a RayJob that runs `batch INPUT OUTPUT` on the cluster instead")
    p.add_argument("--job-args", default="", help='more of the batch\'s options, as typed: '
                   '"--format flac --shifts 2"')
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    for field in dataclasses.fields(ClusterSpec):  # one option per field of the spec
        p.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                       default=field.default, help=f"default: {field.default}")


def run_kuberay(args) -> int:
    from .kuberay import ClusterSpec, job_text, manifest_text
    spec = ClusterSpec(**{field.name: getattr(args, field.name)
                          for field in dataclasses.fields(ClusterSpec)})
    text = (job_text(spec, (*args.job, args.job_args)) if args.job
            else manifest_text(spec, args.config))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser, every command's."""
    parser = argparse.ArgumentParser(prog="python -m serve_graph", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _separate_parser(sub)
    _batch_parser(sub)
    _serve_parser(sub)
    _make_repo_parser(sub)
    _kuberay_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"serve": run_serve, "separate": run_separate, "batch": run_batch,
                "make-repo": run_make_repo,
                "kuberay": run_kuberay}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
