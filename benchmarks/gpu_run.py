"""The steps of the one prepared GPU run (`benchmarks/gpu_run.sh`), one per call, in order of
value: each appends its figures to RESULTS_DIR/figures.jsonl the moment it measures them, so a
step cut short by its timeout loses nothing it measured before.

    python -m benchmarks.gpu_run STEP --results DIR [--rehearsal]

Steps: `machine` (GPU, driver, torch/CUDA, cores), `correctness` (fp32 on the device against
the CPU engine; the out-of-memory back-off under a too-large batch, its log kept; the fp16
overflow guard), `model` (a 216 s song's windows at batch 16/32/64 and all at once: the
compiled inner network in fp16 with its compile time and its start from the cache, then fp16
and bf16 eager and with half-precision GroupNorm; residuals vs fp32), `http` (the service:
the cold start to /readyz, one 216 s song to 4 MP3 stems at LAME's q2, q5 and q7 and to WAV
with Server-Timing, 16 concurrent songs to WAV), `cost` (per song, from the GPU-seconds and
encode CPU-seconds measured, at the prices in `PRICES`), `batch` (issue #25: `python -m
serve_graph batch` over 216 s songs to FLAC with the placement rules' options: the model's busy
share of the pipeline), `roformer` (a batch of full-size BS-RoFormer and
Mel-Band RoFormer windows, bf16, with the TFLOP/s they reach).

`--rehearsal` runs every step on this machine's CPU with the tiny model, a short song and
small batches (tests/test_gpu_rehearsal.py): the same code, so a script error is found here.
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch as th

from benchmarks.common import cycled_songs, full_size_repo, song
from benchmarks.model_sweep import residual_db, timed
from serve_graph.engine import ModelRunner, load_model, make_random_repo, separate
from serve_graph.engine.forward import BatchLimit
from serve_graph.engine.output import encode_stem
from serve_graph.engine.separator import RunnerOptions
from serve_graph.launch import free_port

STEPS = ("machine", "correctness", "model", "http", "cost", "batch", "roformer")
# what each step must record (the rehearsal test checks every one)
EXPECTED = {
    "machine": ["gpu", "torch", "cuda", "cpu_cores"],
    "correctness": ["fp32_parity_db", "oom_halvings", "oom_failed_requests",
                    "fp16_overflow_redone_windows"],
    "model": ["ms_per_window", "song_alone_ms", "residual_db", "compile_seconds",
              "cached_start_seconds"],
    "http": ["cold_start_s", "one_song_mp3_s", "one_song_mp3_q5_s", "one_song_mp3_q7_s",
             "one_song_wav_s", "concurrent_wav_x_real_time"],
    "cost": ["usd_per_song_wav", "usd_per_song_mp3", "usd_per_song_mp3_q5", "usd_per_song_mp3_q7"],
    "batch": ["batch_model_busy", "batch_model_busy_after_first_song", "batch_x_real_time"],
    "roformer": ["roformer_ms_per_window"],
}
# Modal's per-second prices (USD), as published: B200 $6.25/h (blaxel.ai's Modal guide, 2026),
# H100 $0.001097/s (techbytes.app, verified 2026-05-07), CPU $0.0000131 per physical core
# (beam.cloud's Modal pricing guide, verified 2026-06-27); Modal bills the GPU and the
# container's cores by the second
PRICES = {"gpu_b200": 6.25 / 3600, "gpu_h100": 0.001097, "cpu_core": 0.0000131}
# LAME's -q for the MP3 figures: Demucs' q2 (the service's default) under its plain name, then
# the faster settings that issue #24's "216 s -> 4 MP3 stems <= 1.0 s" may need (on one core
# q5 and q7 encode a 216 s stem 2.2x and 3.7x faster than q2, RESULTS.md "encoders")
MP3_QUALITIES = {2: "", 5: "_q5", 7: "_q7"}


class Profile(tp.NamedTuple):
    """What a run measures on: the GPU's, or the rehearsal's on the CPU."""
    device: str
    song_seconds: float
    excerpt_seconds: float
    batch_sizes: tp.Tuple[int, ...]
    precisions: tp.Tuple[str, ...]
    concurrency: int
    compile_backend: str
    repeats: int
    batch_songs: int  # the batch step's
    served: str  # the precision compiled (model step) and served (http, batch)
    warmups: int = 1  # runs before each timed one (the rehearsal's figures need none)


# served in fp16: issue #24's target is <= 3 ms a window at <= -60 dB vs fp32, and on the H100
# bf16 came to -45 dB, fp16 to -63 dB (GPU_NOTES.md); fp16's overflow is caught per window
# (ModelRunner runs a non-finite window again in fp32)
GPU = Profile("cuda", 216., 10., (16, 32, 64), ("fp16", "bf16"), 16, "inductor", 3, 32, "fp16")
# fp32 only: this CPU may have no fast bf16/fp16 (the steps' code is the same)
REHEARSAL = Profile("cpu", 2., 2., (2,), ("fp32",), 2, "eager", 1, 3, "fp32", warmups=0)


class Figures:
    """RESULTS_DIR/figures.jsonl: one JSON object per figure, written and synced at once."""

    def __init__(self, folder: Path, step: str):
        self.path, self.step = folder / "figures.jsonl", step
        folder.mkdir(parents=True, exist_ok=True)

    def record(self, name: str, value: tp.Any, unit: str = "", **detail: tp.Any) -> None:
        line = {"step": self.step, "name": name, "value": value, "unit": unit, **detail}
        with self.path.open("a") as out:
            out.write(json.dumps(line) + "\n")
            out.flush()
            os.fsync(out.fileno())
        print(f"{self.step}: {name} = {value} {unit} {detail or ''}", flush=True)

    def read(self) -> tp.List[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def model_repo(args) -> Path:
    """The full-size random htdemucs repo, or (rehearsal) a tiny one beside the results."""
    return tiny_repo(args) if args.rehearsal else full_size_repo()


def tiny_repo(args) -> Path:
    """A tiny random htdemucs repo beside the results (made once)."""
    repo = args.results.parent / f"{args.results.name}_tiny_repo"
    if not (repo / "htdemucs.yaml").is_file():
        make_random_repo(repo, "htdemucs", size="tiny", seed=0)
    return repo


def machine(args, figures: Figures) -> None:
    gpu = "none (CPU rehearsal)"
    if th.cuda.is_available():
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True)
        gpu = query.stdout.strip() or th.cuda.get_device_name()
    figures.record("gpu", gpu)
    figures.record("torch", th.__version__)
    figures.record("cuda", th.version.cuda or "none")
    figures.record("cpu_cores", os.cpu_count(), platform.processor() or platform.machine())
    figures.record("image_packages", {name: package_version(name) for name in IMAGE_PACKAGES})


# what the offline bundle leaves to the image (no room in the 64 MiB carried: pyarrow and
# pandas are ~40 MB packed) and the batch step needs: Ray Data's blocks and the manifest. The
# device library's KINDS.md lists both in the H100/H200 image (as read on 2026-11-17)
IMAGE_PACKAGES = ("pyarrow", "pandas")


def package_version(name: str) -> tp.Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def correctness(args, figures: Figures) -> None:
    profile, model = args.profile, load_model("htdemucs", model_repo(args))
    excerpt = song(profile.excerpt_seconds, seed=1)
    reference = separate(ModelRunner(model, "cpu"), excerpt, batch_size=4)
    device = ModelRunner(load_model("htdemucs", model_repo(args)), profile.device, "fp32")
    figures.record("fp32_parity_db", residual_db(separate(device, excerpt, batch_size=8),
                                                 reference), "dB", goal="<= -80")
    del device, model
    if profile.device == "cuda":
        th.cuda.empty_cache()  # the cap below counts what the allocator holds
    halvings, failed = oom_backoff(args, profile)
    figures.record("oom_halvings", halvings)
    figures.record("oom_failed_requests", failed, goal=0)
    redone, residual = fp16_overflow(args, profile)
    figures.record("fp16_overflow_redone_windows", redone, goal=2,
                   residual_db_vs_fp32=round(residual, 1))


def fp16_overflow(args, profile: Profile) -> tp.Tuple[int, float]:
    """The tiny model made to overflow fp16 (its first convolution 10^5 times louder), fp16
    with CUDA graphs on the device: two windows of noise overflow, one of silence does not.
    Returns (windows run again in fp32, the worst stem's residual of the two vs fp32)."""
    def runner(precision: str) -> ModelRunner:
        bag = load_model("htdemucs", tiny_repo(args))
        with th.no_grad():
            bag.models[0].encoder[0].conv.weight.mul_(1e5)
        return ModelRunner(bag, options=RunnerOptions(profile.device, precision, "graphs",
                                                      max_batch=4))
    fp16 = runner("fp16")
    length = fp16.geometry.input_length(0, fp16.geometry.segment_lengths[0])
    windows = th.randn(3, 2, length, generator=th.Generator().manual_seed(5)) * 0.3
    windows[1] = 0
    out, exact = fp16(0, windows), runner("fp32")(0, windows)
    return fp16.fp32_redone_windows, residual_db(out[[0, 2]], exact[[0, 2]])


def oom_backoff(args, profile: Profile) -> tp.Tuple[int, int]:
    """A song whose batches do not fit: the limit set above what fits (on the GPU, under a
    memory cap; in the rehearsal, a forward that fails like cuFFT out of memory above 2
    windows), then separated. Returns (halvings, failed requests); the log goes to oom.log."""
    runner = ModelRunner(load_model("htdemucs", model_repo(args)), profile.device, "fp16"
                         if profile.device == "cuda" else "fp32")
    runner.limits[0] = BatchLimit(256)
    if profile.device == "cuda":
        th.cuda.set_per_process_memory_fraction(0.1)
    else:
        def fits_two(forward: tp.Callable) -> tp.Callable:
            def forward_or_fail(windows: th.Tensor) -> th.Tensor:
                if windows.shape[0] > 2:
                    raise RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED (rehearsal)")
                return forward(windows)
            return forward_or_fail
        runner.wrap_forward(0, fits_two)
    failed = 0
    with (args.results / "oom.log").open("a") as log, contextlib.redirect_stderr(log):
        import logging
        handler = logging.StreamHandler(log)
        logging.getLogger("serve_graph.engine.forward").addHandler(handler)
        try:
            separate(runner, song(profile.song_seconds, seed=2), batch_size=256)
        except Exception as exc:  # noqa: BLE001 (the figure is whether it failed)
            failed = 1
            log.write(f"failed: {exc!r}\n")
        finally:
            if profile.device == "cuda":
                th.cuda.set_per_process_memory_fraction(1.0)
    return runner.limits[0].halvings, failed


# the model step's variants in order of value: the compiled network decides issue #24's target
# (compile, group_norm, dconv)
VARIANTS = {"compiled": ("compile", "half", "torch"), "eager": ("none", "fp32", "torch"),
            "half_group_norm": ("none", "half", "torch"),
            "fused_dconv": ("none", "half", "triton")}


def model(args, figures: Figures) -> None:
    """Per-window time of each precision x variant on a song's windows, and the residual of
    an excerpt against fp32 on the same device: first the compiled network in the served
    precision (with its compile time and its start from the cache), then eager, half
    GroupNorm and half GroupNorm with the fused DConv kernels in each precision.
    GPU_RUN_VARIANTS="eager half_group_norm fused_dconv" runs only those (a rerun of what a
    cut step did not reach)."""
    profile = args.profile
    chosen = os.environ.get("GPU_RUN_VARIANTS", " ".join(VARIANTS)).split()
    excerpt = song(profile.excerpt_seconds, seed=1)
    fp32 = separate(runner_for(args, "fp32", "none", "fp32"), excerpt, batch_size=8)
    windows = song_windows(args, profile.song_seconds)
    if "compiled" in chosen:
        compiled(args, figures, windows, excerpt, fp32)
    for precision in profile.precisions:
        for variant in (name for name in VARIANTS if name != "compiled" and name in chosen):
            runner = runner_for(args, precision, *VARIANTS[variant])
            measure(args, figures, runner, windows, excerpt, fp32, precision, variant)
            del runner  # its device memory, before the next


def compiled(args, figures: Figures, windows: th.Tensor, excerpt: th.Tensor,
             fp32: th.Tensor) -> None:
    """The compiled inner network in the served precision: compile seconds (its CUDA graphs
    captured too), its speed and residual, then its start in a new process from the cache."""
    precision = args.profile.served
    start = time.perf_counter()
    runner = runner_for(args, precision, *VARIANTS["compiled"])
    figures.record("compile_seconds", round(time.perf_counter() - start, 2), "s",
                   precision=precision)
    measure(args, figures, runner, windows, excerpt, fp32, precision, "compiled")
    del runner
    figures.record("cached_start_seconds", cached_start(args, precision), "s",
                   precision=precision)


def runner_for(args, precision: str, compile_mode: str, group_norm: str,
               dconv: str = "torch") -> ModelRunner:
    options = RunnerOptions(args.profile.device, precision, compile_mode,
                            max(args.profile.batch_sizes), group_norm=group_norm,
                            compile_backend=args.profile.compile_backend, dconv=dconv)
    return ModelRunner(load_model("htdemucs", model_repo(args)), options=options)


def song_windows(args, seconds: float) -> th.Tensor:
    from serve_graph.engine.plan import plan_windows
    from serve_graph.engine.windows import normalise, window_input
    runner = ModelRunner(load_model("htdemucs", model_repo(args)), "cpu")
    mix, _, _ = normalise(song(seconds))
    plan = plan_windows(mix.shape[-1], runner.geometry, shifts=1, seed=0)
    return th.stack([window_input(mix, window) for window in plan.windows])


def measure(args, figures: Figures, runner: ModelRunner, windows: th.Tensor,
            excerpt: th.Tensor, fp32: th.Tensor, precision: str, variant: str) -> None:
    for size in args.profile.batch_sizes:
        batch = th.cat([windows] * -(-size // len(windows)))[:size]
        seconds = timed(lambda: runner(0, batch), runner.device, args.profile.repeats,
                        args.profile.warmups)
        figures.record("ms_per_window", round(seconds / size * 1000, 3), "ms",
                       precision=precision, variant=variant, batch=size)
    # one song's windows at once, as a lone request sends them (compiled: CUDA graphs, padded
    # up to a bucket; H100 bf16 on 2026-11-24: eager 375 ms, graphs cut 32 + 4 + 1 526 ms)
    seconds = timed(lambda: runner(0, windows), runner.device, args.profile.repeats,
                    args.profile.warmups)
    figures.record("song_alone_ms", round(seconds * 1000, 1), "ms", precision=precision,
                   variant=variant, windows=len(windows))
    stems = separate(runner, excerpt, batch_size=max(args.profile.batch_sizes))
    figures.record("residual_db", round(residual_db(stems, fp32), 1), "dB",
                   precision=precision, variant=variant, goal="<= -60")


def cached_start(args, precision: str) -> float:
    """Start-up seconds of the compiled runner in a new process (Inductor's cache warm)."""
    code = ("import sys; from pathlib import Path; from benchmarks import gpu_run; "
            f"args = gpu_run.parse(['model', '--results', {str(args.results)!r}] + "
            f"{['--rehearsal'] if args.rehearsal else []!r}); "
            f"print(gpu_run.runner_for(args, {precision!r}, *gpu_run.VARIANTS['compiled'])"
            ".startup_seconds)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return float("nan")
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def http(args, figures: Figures) -> None:
    from benchmarks.gpu import timed_post
    from benchmarks.throughput import run_requests, start_service, stop_service
    profile = args.profile
    service = service_arguments(args)
    url, process = start_service(service)
    figures.record("cold_start_s", round(time.perf_counter() - service.launched_at, 2), "s",
                   what="launch -> /readyz 200", model=str(service.model_repo))
    try:
        songs = cycled_songs(profile.song_seconds, "mp3", profile.concurrency)
        timed_post(url, songs[0], {"mp3_bitrate": "192"})  # warm
        for quality, suffix in MP3_QUALITIES.items():
            fields = {"mp3_bitrate": "192", "mp3_quality": str(quality)}
            seconds, timing = timed_post(url, songs[0], fields)
            figures.record(f"one_song_mp3{suffix}_s", round(seconds, 3), "s", goal="<= 1.0",
                           mp3_quality=quality, server_timing=timing,
                           song_seconds=profile.song_seconds)
        timed_post(url, songs[0], {"mp3": "false"})  # warm
        seconds, timing = timed_post(url, songs[0], {"mp3": "false"})
        figures.record("one_song_wav_s", round(seconds, 3), "s", server_timing=timing,
                       song_seconds=profile.song_seconds)
        wall, latencies, _, _ = run_requests(url, songs, profile.concurrency, {"mp3": "false"})
        audio = profile.concurrency * profile.song_seconds
        figures.record("concurrent_wav_x_real_time", round(audio / wall, 1), "x",
                       songs=profile.concurrency, wall_s=round(wall, 2),
                       p50_s=round(statistics.median(latencies), 2))
    finally:
        stop_service(process)


def service_arguments(args) -> argparse.Namespace:
    """`benchmarks.throughput`'s service options: on the GPU box one Separate replica with the
    GPU and fp16 (`Profile.served`) + half GroupNorm, CUDA graphs, Decode 2 x 1 CPU, Encode 12
    CPUs and 14 MP3 threads; in the rehearsal the tiny model on the CPU, fp32."""
    gpu = not args.rehearsal
    return argparse.Namespace(
        port=free_port(), model_repo=str(model_repo(args)), precision=args.profile.served,
        compile="graphs" if gpu else "none", group_norm="half" if gpu else "fp32",
        replicas=1, gpus=1 if gpu else 0, max_batch_size=64 if gpu else 4,
        batch_wait=0.005 if gpu else 0.01, decode_replicas=2 if gpu else 1,
        encode_replicas=1, cpus_per_replica=1 if gpu else 0.25,
        encode_cpus=12 if gpu else 0.5, encode_threads=14 if gpu else 2,
        windows_in_flight=64 if gpu else 2)


def cost(args, figures: Figures) -> None:
    """USD per song: the GPU-seconds per song of the concurrent run (the GPU held for all of
    it) at the GPU's price, plus the encode CPU-seconds of its 4 MP3 stems at the core's (at
    each of `MP3_QUALITIES`)."""
    measured = {row["name"]: row for row in figures.read() if row["step"] == "http"}
    concurrent = measured["concurrent_wav_x_real_time"]
    gpu_seconds = concurrent["wall_s"] / concurrent["songs"]
    wav = gpu_seconds * PRICES["gpu_b200"]
    figures.record("usd_per_song_wav", round(wav, 6), "USD", gpu_seconds=round(gpu_seconds, 3),
                   prices=PRICES, goal="<= 0.001")
    stem = song(args.profile.song_seconds, seed=10)
    for quality, suffix in MP3_QUALITIES.items():
        mp3_cpu = four_mp3_stems_cpu_seconds(stem, quality)
        figures.record(f"usd_per_song_mp3{suffix}", round(wav + mp3_cpu * PRICES["cpu_core"], 6),
                       "USD", mp3_quality=quality, mp3_cpu_seconds=round(mp3_cpu, 2))


def four_mp3_stems_cpu_seconds(stem: th.Tensor, quality: int) -> float:
    """CPU-seconds (all threads) of `stem` encoded 4 times to 192 kbps MP3 at LAME's
    `quality`, its chunks on every core."""
    start = time.process_time()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for _ in range(4):
            encode_stem(stem, 44100, "mp3", 192, pool=pool, quality=quality)
    return time.process_time() - start


def batch(args, figures: Figures) -> None:
    """Batch mode (issue #25) as a catalogue runs it: FLAC songs in a folder, FLAC stems out,
    the options `placement.batch_arguments` gives this machine with the http step's precision,
    compile mode and batch; the model's busy share of the pipeline (from Ray up, the actor's start
    included) and from the first song's end on, and x real time."""
    missing = [name for name in IMAGE_PACKAGES if package_version(name) is None]
    if missing:  # at once, not after the songs are written: the next step gets the time
        figures.record("batch_skipped", f"this image has no {', '.join(missing)} (Ray Data "
                       "needs them; the offline bundle has no room for them)")
        sys.exit(3)
    from benchmarks.batch import timed_process
    from benchmarks.batch_busy import write_songs
    from serve_graph.batch.output import BatchOutput
    from serve_graph.placement import NodeShape, batch_arguments
    profile, service = args.profile, service_arguments(args)
    shape = NodeShape(gpus=service.gpus, cpus=os.cpu_count() or 1)
    options = [*batch_arguments(shape), "--precision", service.precision, "--group-norm",
               service.group_norm, "--compile", service.compile,
               "--batch-size", str(service.max_batch_size)]
    folder = Path(tempfile.mkdtemp(prefix="gpu_batch_"))  # RESULTS_DIR holds figures and logs
    try:  # GBs of songs and stems, also when the batch fails
        (folder / "songs").mkdir()
        write_songs(folder / "songs", profile.batch_songs, profile.song_seconds)
        wall, _, err = timed_process([sys.executable, "-m", "serve_graph", "batch",
                                      str(folder / "songs"), str(folder / "out"),
                                      "--model-repo", service.model_repo, "--format", "flac",
                                      *options])
        print(err[-2000:], flush=True)
        run, = BatchOutput(str(folder / "out")).runs()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pipeline = run["seconds"] - run["setup_seconds"]
    figures.record("batch_model_busy", rounded(run["model_busy"]), goal=">= 0.9",
                   pipeline_s=round(pipeline, 2), model_s=round(run["model_seconds"], 2),
                   options=" ".join(options))
    figures.record("batch_model_busy_after_first_song",
                   rounded(run["model_busy_after_first_song"]), goal=">= 0.9")
    figures.record("batch_x_real_time", round(run["audio_seconds"] / pipeline, 1), "x",
                   songs=run["separated"], audio_s=run["audio_seconds"],
                   whole_command_s=round(wall, 2), ray_start_s=round(run["setup_seconds"], 2))


def rounded(share: tp.Optional[float]) -> tp.Optional[float]:
    return None if share is None else round(share, 3)


def roformer(args, figures: Figures) -> None:
    """Seconds per window of viperx's BS-RoFormer and Kim's Mel-Band RoFormer (random weights,
    full size; the rehearsal: narrow and shallow), bf16 at batch 8 on the GPU."""
    from serve_graph.engine import roformer_files
    from serve_graph.engine.roformer import RoformerSeparator
    from serve_graph.engine.roformer_config import read_config
    gpu = not args.rehearsal
    for family in ("bs_roformer", "mel_band_roformer"):
        raw = (roformer_files.TEMPLATES[family] if gpu else
               roformer_files.scaled(family, dim=16, depth=1, heads=2, dim_head=8))
        with tempfile.TemporaryDirectory(prefix="roformer_") as scratch:  # (not RESULTS_DIR)
            config = read_config(roformer_files.write_config(Path(scratch) / "config.yaml", raw))
        model = RoformerSeparator(roformer_files.random_model(config))
        gflop = model.roformer.window_gflop(config.chunk_size)
        batch = 8 if gpu else 1
        runner = ModelRunner(model, options=RunnerOptions(
            args.profile.device, "bf16" if gpu else "fp32", max_batch=batch))
        windows = th.randn(batch, 2, config.chunk_size)
        seconds = timed(lambda: runner(0, windows), runner.device, args.profile.repeats,
                        args.profile.warmups) / batch
        figures.record("roformer_ms_per_window", round(seconds * 1000, 2), "ms",
                       family=family, batch=batch, gflop=round(gflop, 1),
                       tflops=round(gflop / seconds / 1000, 1))
        del runner, model


def parse(argv: tp.Optional[tp.Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--rehearsal", action="store_true",
                        help="on this CPU, tiny model, short song, small batches")
    args = parser.parse_args(argv)
    # GPU_RUN_COMPILE_BACKEND=inductor: the rehearsal compiles as the GPU run does (Dynamo and
    # Inductor, here its C++ kernels: ~2 min for the tiny model on 2 cores) instead of eager
    args.profile = GPU if not args.rehearsal else REHEARSAL._replace(compile_backend=(
        os.environ.get("GPU_RUN_COMPILE_BACKEND", REHEARSAL.compile_backend)))
    return args


def stop_on_sigterm() -> None:
    """At a step's limit `timeout` sends SIGTERM: SIGKILL every process the step started (a
    service, a batch, their Ray; on the GPU box they would keep the GPU and the cores the
    next steps measure on), then exit 143. Figures are on disk already (`Figures.record`)."""
    from serve_graph.procs import descendants, kill_all

    def stop(signum, _frame):
        kill_all(descendants(os.getpid()))
        print(f"stopped by signal {signum}: the processes this step started are killed",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    stop_on_sigterm()
    args = parse(argv)
    if args.rehearsal:  # the fused DConv kernels in Triton's interpreter (before its import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not args.rehearsal and not th.cuda.is_available():
        sys.exit("the GPU run needs a CUDA GPU (--rehearsal runs it on the CPU)")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.results.parent /
                                                       f"{args.results.name}_inductor_cache"))
    globals()[args.step](args, Figures(args.results, args.step))


if __name__ == "__main__":
    main()
