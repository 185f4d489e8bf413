"""HTTP throughput of the service: N songs from C concurrent clients against POST /separate.

Starts the real graph (`serve run` on serve_config.yaml with the overrides given here, the
full-size random htdemucs repo by default) or targets --url. Reports requests/s,
audio-seconds separated per second, p50/p95 latency and the mean batch size the Separate
deployment formed (from its /stats counters), and appends them to RESULTS.md.

    python -m benchmarks.throughput --songs 4 --concurrency 2 --seconds 15
    python -m benchmarks.throughput --url http://host:8000 --songs 16 --concurrency 16 --seconds 216
"""
import argparse
import contextlib
import io
import os
import signal
import statistics
import subprocess
import tempfile
import time
import typing as tp
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.common import append_results, full_size_repo, song
from serve_graph.engine.output import encode_stem
from serve_graph.launch import deploy_failure, launch, write_config


def service_config(args, folder: Path) -> Path:
    """serve_config.yaml with this run's model, precision, replicas and batching."""
    cpus = {"num_cpus": args.cpus_per_replica}
    service_args = {"model_repo": args.model_repo or str(full_size_repo()),
                    "precision": args.precision, "compile": args.compile,
                    "result_cache_mb": 0}  # repeated songs: every request runs the model
    for name in ("windows_in_flight", "encode_threads", "group_norm"):
        if getattr(args, name, None) is not None:
            service_args[name] = getattr(args, name)
    return write_config(
        folder / "serve_config.yaml", port=args.port, host="127.0.0.1", args=service_args,
        deployments={
            "Separate": {"num_replicas": args.replicas, "max_ongoing_requests": 1024,
                         "ray_actor_options": {"num_gpus": args.gpus, "num_cpus": 1},
                         "user_config": {"max_batch_size": args.max_batch_size,
                                         "batch_wait_timeout_s": args.batch_wait}},
            "Decode": {"num_replicas": args.decode_replicas, "ray_actor_options": cpus},
            "Encode": {"num_replicas": args.encode_replicas,
                       "ray_actor_options": {"num_cpus": args.encode_cpus or
                                             args.cpus_per_replica}}})


def start_service(args, config: tp.Optional[Path] = None) -> tuple:
    """`serve run` of `config` (default: `service_config(args)`) in a new process group;
    returns (url, process) once `/readyz` says the model is loaded (`GET /` answers earlier,
    while Separate still loads, compiles or captures). `args.launched_at` records when it was
    launched."""
    folder = Path(tempfile.mkdtemp(prefix="throughput_"))
    config = config or service_config(args, folder)
    log = (folder / "serve.log").open("w")
    args.launched_at = time.perf_counter()
    process = launch(config, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None:
        if deploy_failure(folder / "serve.log"):
            break
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return url, process
        except requests.RequestException:
            pass
        time.sleep(1)
    with contextlib.suppress(ProcessLookupError):  # it may have ended by itself
        os.killpg(process.pid, signal.SIGKILL)
    tail = (folder / "serve.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the service did not start; {folder / 'serve.log'} ends:\n{tail}")


def stop_service(process) -> None:
    """SIGINT: `serve run` shuts down Serve and its local Ray; SIGKILL if it hangs."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_requests(url: str, songs: tp.List[bytes], concurrency: int, fields: dict,
                 save_to: tp.Optional[Path] = None) -> tuple:
    """POST every song with `concurrency` clients: (wall seconds, sorted latencies, the
    stats of Separate before and after). `save_to`: each answer's stems are saved as a user
    would, in `save_to/<song's index>/` (the ZIP extracted)."""
    before = requests.get(url + "/stats", timeout=30).json()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(
            lambda item: _post(url, item[1], fields,
                               save_to and save_to / f"{item[0]:03d}"), enumerate(songs)))
    wall = time.perf_counter() - start
    after = requests.get(url + "/stats", timeout=30).json()
    return wall, latencies, before, after


def percentile(values: tp.Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model-repo", help="default: the full-size random htdemucs repo")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--compile", default="none", choices=["none", "graphs", "compile"])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--gpus", type=float, default=0)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-wait", type=float, default=0.0)
    parser.add_argument("--decode-replicas", type=int, default=1)
    parser.add_argument("--encode-replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=0.25,
                        help="CPUs of each Decode and Encode replica")
    parser.add_argument("--encode-cpus", type=float, help="CPUs of each Encode replica")
    parser.add_argument("--encode-threads", type=int,
                        help="MP3 threads per Encode replica (default: its CPUs)")
    parser.add_argument("--windows-in-flight", type=int,
                        help="windows of one song queued at Separate at a time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="target a running service instead of starting one")
    parser.add_argument("--songs", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.)
    parser.add_argument("--two-stems", default="")
    parser.add_argument("--wav", action="store_true", help="WAV stems instead of MP3")
    add_service_arguments(parser)
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        url, process = start_service(args)
        up_after = time.perf_counter() - args.launched_at
    try:
        info = requests.get(url + "/", timeout=30).json()
        songs = [encode_stem(song(args.seconds, seed=i), 44100, "mp3", 192)
                 for i in range(args.songs)]
        fields = {"two_stems": args.two_stems} if args.two_stems else {}
        if args.wav:
            fields["mp3"] = "false"
        first = _post(url, songs[0], fields)  # warm-up: first forward, allocator, connections
        cold_start = ("" if args.url else f"- cold start: `GET /` answered {up_after:.1f} s "
                      f"after launch (Ray, Serve, model load); the first /separate then took "
                      f"{first:.1f} s, so {up_after + first:.1f} s from process start to the "
                      f"first stems")
        wall, latencies, before, after = run_requests(url, songs, args.concurrency, fields)
    finally:
        if process is not None:
            stop_service(process)
    batches = after["batches"] - before["batches"]
    windows = after["windows"] - before["windows"]
    append_results(
        f"HTTP throughput, {args.songs} songs x {args.seconds:.0f} s, concurrency "
        f"{args.concurrency}",
        [f"- service: {info['model']} on {info['device']} ({info['precision']}), "
         f"Separate replicas {args.replicas}, max_batch_size {args.max_batch_size}, "
         f"batch_wait_timeout_s {args.batch_wait}; "
         f"{'started here' if args.url is None else 'at ' + args.url}",
         f"- wall time: {wall:.1f} s; requests/s: {args.songs / wall:.3f}; "
         f"audio seconds per second: {args.songs * args.seconds / wall:.2f}",
         f"- latency p50 {statistics.median(latencies):.1f} s, "
         f"p95 {percentile(latencies, 0.95):.1f} s",
         f"- Separate: {windows} windows in {batches} forward passes, mean batch size "
         f"{windows / max(batches, 1):.2f}, passes holding several requests: "
         f"{after['multi_request_batches'] - before['multi_request_batches']}",
         *([cold_start] if cold_start else [])])


def _post(url: str, data: bytes, fields: dict, save_to: tp.Optional[Path] = None) -> float:
    """One song separated: its latency (with `save_to`: its stems extracted there)."""
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("song.mp3", data)},
                             data=fields, timeout=3600)
    response.raise_for_status()
    if save_to is not None:
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            archive.extractall(save_to)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
