"""The GPU sequence in one command: model-only sweep, torch.compile with its cache, the service
end to end over HTTP and 16 concurrent songs; appends everything to RESULTS.md.

    python -m pytest                       # first: the whole suite, tests/test_cuda.py included
    python -m benchmarks.gpu               # then this (both parts, ~8 min on an H100)
    python -m benchmarks.gpu --parts http --precision bf16 --compile compile

Parts: `model` (precision x forward mode x batch size on a 216 s song, residuals against the
fp32 CPU engine, then torch.compile of the fastest precision and a fresh process loading the
compiled kernels from the cache), `http` (the real service: one 216 s song warm, MP3 and WAV,
then 16 concurrent songs, WAV and MP3, and the MP3 codec's CPU ceiling), `roformer` (one batch
of full-size BS-RoFormer and Mel-Band RoFormer windows beside htdemucs', bf16:
`benchmarks/roformer_windows.py`). The `http` part takes the precision and mode that `model`
found fastest, unless given.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch as th

from benchmarks import roformer_windows
from benchmarks.common import append_results, full_size_repo, song
from benchmarks.model_sweep import EXCERPT_SECONDS, Sweep, run_sweep
from benchmarks.throughput import (_post, add_service_arguments, percentile, run_requests,
                                   start_service, stop_service)
from serve_graph.engine.modes import COMPILE_MODES
from serve_graph.engine.output import encode_stem

CHOICE = Path(os.environ.get("SERVE_GRAPH_BENCH_CACHE", Path.home() / ".cache" / "serve_graph")
              ) / "gpu_choice.json"


def model_part(args) -> None:
    """Eager and CUDA graphs at every precision, appended; then torch.compile of the fastest
    autocast precision (or the first of `--precisions` when only compile is asked for) and its
    start-up from the cache, appended; the fastest is kept for the `http` part."""
    sweep = Sweep("cuda", args.song_seconds)
    modes = [mode for mode in args.modes if mode != "compile"]
    rows: tp.List[dict] = []
    try:
        run_sweep(sweep, args.precisions, modes, args.batch_sizes, args.repeats, rows)
    finally:  # also when a configuration fails or the run is stopped (SIGTERM)
        if rows:
            append_results(f"GPU model only: {args.song_seconds:.0f} s song, precision x mode "
                           f"x batch", [sweep_header(sweep), *[
                               sweep.line(r["precision"], r["compile"], r) for r in rows]])
            save_choice(max(rows, key=lambda r: r["throughput_rtf"]))
    if "compile" not in args.modes:
        return
    autocast = [r for r in rows if r["precision"] in ("bf16", "fp16") and r["compile"] == "graphs"]
    precision = max(autocast, key=lambda r: r["throughput_rtf"])["precision"] if autocast \
        else args.precisions[0]
    compiled = run_sweep(sweep, [precision], ["compile"], args.batch_sizes, args.repeats)
    restart = cached_start(precision, max(args.batch_sizes))
    fastest = max(rows + compiled, key=lambda r: r["throughput_rtf"])
    save_choice(fastest)
    append_results(f"GPU torch.compile ({precision}), {args.song_seconds:.0f} s song", [
        sweep_header(sweep), *[sweep.line(r["precision"], r["compile"], r) for r in compiled],
        f"- torch.compile start-up: {compiled[0]['startup']:.1f} s in a fresh cache (compile + "
        f"graph capture), {restart:.1f} s in a new process with the cache "
        f"(TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')})",
        f"- fastest of this run: {fastest['precision']} {fastest['compile']}, "
        f"{fastest['throughput_rtf']:.0f}x real time at its best batch size, one song alone "
        f"{fastest['rtf']:.0f}x, residual {fastest['residual']:.1f} dB"])


def sweep_header(sweep: Sweep) -> str:
    return (f"- song {sweep.song_seconds:.0f} s = {len(sweep.windows)} windows (shifts 1, "
            f"overlap 0.25), full-size htdemucs (random weights); times include "
            f"host->device->host copies; residual: {EXCERPT_SECONDS:.0f} s excerpt against the "
            f"fp32 CPU engine ({sweep.reference_seconds:.1f} s on the CPU)")


def save_choice(row: dict) -> None:
    CHOICE.parent.mkdir(parents=True, exist_ok=True)
    CHOICE.write_text(json.dumps({"precision": row["precision"], "compile": row["compile"]}))


def cached_start(precision: str, max_batch: int) -> float:
    """Start-up seconds of a compiled runner in a new process (the cache is warm by now)."""
    code = ("import copy, sys; from benchmarks.common import full_size_repo; "
            "from serve_graph.engine import ModelRunner, load_model; "
            "from serve_graph.engine.separator import RunnerOptions; "
            f"r = ModelRunner(load_model('htdemucs', full_size_repo()), options=RunnerOptions("
            f"'cuda', '{precision}', 'compile', {max_batch})); print(r.startup_seconds)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        print(out.stderr[-3000:])
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def mp3_cpu_seconds(seconds: float) -> float:
    """CPU seconds to encode the 4 stems of a song as 192 kbps MP3 (one thread at a time)."""
    start = time.process_time()
    for index in range(4):
        encode_stem(song(seconds, seed=10 + index), 44100, "mp3", 192)
    return time.process_time() - start


def http_part(args) -> None:
    if args.precision is None or args.compile is None:
        choice = json.loads(CHOICE.read_text()) if CHOICE.exists() else {}
        args.precision = args.precision or choice.get("precision", "bf16")
        args.compile = args.compile or choice.get("compile", "graphs")
    url, process = start_service(args)
    up_after = time.perf_counter() - args.launched_at
    lines = []
    try:
        info = requests.get(url + "/", timeout=30).json()
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # LAME releases the GIL
            songs = list(pool.map(lambda i: encode_stem(song(args.song_seconds, seed=i), 44100,
                                                        "mp3", 192), range(args.concurrency)))
        formats = {"mp3": {}, "wav": {"mp3": "false"}}
        for fields in formats.values():
            _post(url, songs[0], fields)  # warm-up
        lines.append(f"- service: {json.dumps(info)}; `GET /` answered {up_after:.1f} s "
                     f"after launch")
        for name, fields in formats.items():
            latencies = [timed_post(url, songs[0], fields) for _ in range(args.repeats)]
            timing = latencies[-1][1]
            lines.append(f"- one {args.song_seconds:.0f} s song -> 4 {name.upper()} stems, warm: "
                         f"{', '.join(f'{t:.2f}' for t, _ in latencies)} s (median "
                         f"**{statistics.median(t for t, _ in latencies):.2f} s**); "
                         f"Server-Timing of the last: {timing}")
            print(lines[-1], flush=True)
        for name, fields in (("wav", formats["wav"]), ("mp3", formats["mp3"])):
            wall, latencies, before, after = run_requests(url, songs, args.concurrency, fields)
            windows = after["windows"] - before["windows"]
            batches = after["batches"] - before["batches"]
            audio = args.concurrency * args.song_seconds
            lines.append(f"- {args.concurrency} concurrent {args.song_seconds:.0f} s songs, "
                         f"{name.upper()}: {wall:.2f} s = **{audio / wall:.0f}x real time**, "
                         f"latency p50 {statistics.median(latencies):.2f} s, p95 "
                         f"{percentile(latencies, 0.95):.2f} s; {windows} windows in {batches} "
                         f"batches (mean {windows / max(batches, 1):.1f})")
            print(lines[-1], flush=True)
    finally:
        stop_service(process)
    cores = os.cpu_count() or 1
    with ThreadPoolExecutor(1) as pool:  # a clean thread: process_time counts this process
        cpu = pool.submit(mp3_cpu_seconds, args.song_seconds).result()
    lines.append(f"- MP3 codec: {cpu:.1f} CPU-s per song (4 stems at 192 kbps, LAME q2); "
                 f"ceiling on {cores} cores: {cores / cpu:.2f} songs/s = "
                 f"{cores / cpu * args.song_seconds:.0f}x real time if every core encoded")
    append_results(f"GPU end to end over HTTP ({args.precision}, {args.compile})", lines)


def timed_post(url: str, data: bytes, fields: dict) -> tp.Tuple[float, str]:
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("song.mp3", data)},
                             data=fields, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start, response.headers.get("Server-Timing", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["model", "http", "roformer"],
                        choices=["model", "http", "roformer"])
    parser.add_argument("--song-seconds", type=float, default=216.)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--modes", nargs="+", default=list(COMPILE_MODES), choices=COMPILE_MODES)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    add_service_arguments(parser)
    # a 16-core GPU box: Separate 1 CPU + the GPU, Decode 2 x 1 CPU, Encode one replica with
    # 12 CPUs and 14 MP3 threads (one song's stems encode on all of them), every window of a
    # 216 s song (37) queued at once so that a song fills the GPU's batches
    parser.set_defaults(precision=None, compile=None, gpus=1, max_batch_size=64,
                        batch_wait=0.005, decode_replicas=2, encode_replicas=1,
                        cpus_per_replica=1, encode_cpus=12, encode_threads=14,
                        windows_in_flight=64)
    args = parser.parse_args()
    # `timeout` stops with SIGTERM: exit through the `finally` blocks that record results
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not th.cuda.is_available():
        sys.exit("benchmarks.gpu needs a CUDA GPU")
    full_size_repo()
    if "model" in args.parts:
        model_part(args)
    if "http" in args.parts:
        http_part(args)
    if "roformer" in args.parts:
        roformer_windows.main(["--device", "cuda", "--precision", "bf16", "--batch-size", "8",
                               "--repeats", "3", "--warmups", "1"])


if __name__ == "__main__":
    main()
