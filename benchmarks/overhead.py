"""Everything but the model: a 216 s song through the HTTP service with a stand-in model of
htdemucs' exact window geometry (7.8 s segments, 4 stems, 44.1 kHz stereo) whose forward costs
almost nothing. Reports the end-to-end time and, from the service's Server-Timing header and
Separate's counters, time and CPU-seconds by stage, for Encode given 1 and 2 CPUs; with
`--full`, the full-size model instead (is the encoding hidden behind the model?).

    python -m benchmarks.overhead --seconds 216 --repeats 3 --encode-cpus 1 2
    python -m benchmarks.overhead --seconds 900 --shifts 5 --repeats 1 --encode-cpus 2 \
        --formats mp3 --no-warmup
    python -m benchmarks.overhead --full --seconds 60 --repeats 1 --encode-cpus 1 --formats mp3
"""
import argparse
import os
import statistics
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

import requests

from benchmarks.common import CACHE, append_results, full_size_repo, song
from benchmarks.throughput import start_service, stop_service
from serve_graph.engine import make_random_repo
from serve_graph.engine.output import encode_stem
from serve_graph.launch import write_config
from serve_graph.procs import memory_mb, replica_pids


def standin_repo() -> Path:
    repo = CACHE / "htdemucs_standin"
    if not (repo / "htdemucs.yaml").is_file():
        make_random_repo(repo, "htdemucs", size="standin", seed=0)
    return repo


def config(args, folder: Path, encode_cpus: int) -> Path:
    """The shipped config, Encode given `encode_cpus` CPUs and as many encoding threads, the
    rest no CPUs (they fit a 2-core box; Separate's torch threads use every core regardless)."""
    none = {"ray_actor_options": {"num_cpus": 0}}
    return write_config(
        folder / "serve_config.yaml", port=args.port, host="127.0.0.1",
        args={"model_repo": str(full_size_repo() if args.full else standin_repo()),
              "max_windows": 100_000, "windows_in_flight": args.windows_in_flight,
              "encode_threads": encode_cpus,
              "result_cache_mb": 0},  # every request runs the model  # serve_config.yaml's own is 2
        deployments={"Ingress": none, "Decode": none, "Separate": none,
                     "Encode": {"ray_actor_options": {"num_cpus": encode_cpus}}})


class MemoryWatch:
    """Samples a replica's memory every 0.2 s in a thread: peak VmRSS and peak RssAnon (its
    own memory; VmRSS also counts the object-store pages it has read, shared with the store)."""

    def __init__(self, service_pid: int, deployment: str):
        self.pid = replica_pids(service_pid).get(deployment)
        self.peak_rss = self.peak_anon = 0.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            memory = memory_mb(self.pid)
            if not memory:  # the replica is gone
                return
            self.peak_rss = max(self.peak_rss, memory.get("VmRSS", 0.))
            self.peak_anon = max(self.peak_anon, memory.get("RssAnon", 0.))

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        return (f"peak RSS {self.peak_rss:.0f} MB, of which its own (RssAnon) "
                f"{self.peak_anon:.0f} MB")


def server_timing(header: str) -> tp.Dict[str, float]:
    """`decode;dur=12, windows;dur=340` -> {"decode": 0.012, "windows": 0.34}."""
    stages = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        stages[name] = float(duration) / 1000
    return stages


def measure(url: str, data: bytes, fields: dict) -> tp.Dict[str, float]:
    """One request: end-to-end seconds, the service's stages and Separate's model seconds."""
    before = requests.get(url + "/stats", timeout=30).json()["model_seconds"]
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("song.mp3", data)},
                             data=fields, timeout=3600)
    end_to_end = time.perf_counter() - start
    response.raise_for_status()
    after = requests.get(url + "/stats", timeout=30).json()["model_seconds"]
    return dict(server_timing(response.headers["Server-Timing"]), end_to_end=end_to_end,
                model=after - before, zip_mb=len(response.content) / 2**20)


def run(args, encode_cpus: int, data: bytes) -> tp.List[str]:
    args.port = args.port or 8766
    folder = Path(tempfile.mkdtemp(prefix="overhead_"))
    url, process = start_service(args, config(args, folder, encode_cpus))
    lines = []
    try:
        memory = MemoryWatch(process.pid, "Encode")
        for output in args.formats:
            fields = {"shifts": args.shifts, "mp3": str(output == "mp3").lower()}
            if args.warmup:
                measure(url, data, fields)
            runs = [measure(url, data, fields) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["end_to_end"])
            lines.append(describe(output.upper(), encode_cpus, best, runs))
        lines.append(f"  - Encode replica, sampled over the whole run: {memory.stop()}")
    finally:
        stop_service(process)
    return lines


def describe(output: str, cpus: int, best: dict, runs: tp.List[dict]) -> str:
    median = statistics.median(r["end_to_end"] for r in runs)
    stages = ", ".join(f"{name} {best[name]:.2f}" for name in
                       ("decode", "windows", "model", "overlap_add", "encode", "encode_cpu",
                        "finish", "zip") if name in best)
    rest = best["end_to_end"] - best["model"]
    line = (f"- {output}, Encode {cpus} CPU(s): end to end **{best['end_to_end']:.2f} s** "
            f"(median {median:.2f} of {len(runs)}); model {best['model']:.2f} s; "
            f"end to end minus model {rest:.2f} s; stages (s): {stages}; ZIP "
            f"{best['zip_mb']:.1f} MB")
    if output == "MP3" and best.get("encode_cpu"):
        bound = best["encode_cpu"] / cpus
        outside = best["end_to_end"] - max(best["model"], best["encode"])
        line += (f"; encode wall / (CPU-s / cores) = {best['encode'] / bound:.2f} (goal <= "
                 f"1.15); outside the model and the MP3 encoder (end to end - max(model, "
                 f"encode wall)) **{outside:.2f} s** (goal <= 0.5)")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=216.)
    parser.add_argument("--shifts", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encode-cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--windows-in-flight", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="the full-size model (random "
                        "weights) instead of the stand-in")
    parser.add_argument("--formats", nargs="+", default=["mp3", "wav"], choices=["mp3", "wav"])
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="no warm-up request before the measured ones")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    data = encode_stem(song(args.seconds, seed=3), 44100, "mp3", 320)
    model = ("full-size htdemucs (random weights)" if args.full else
             "stand-in (htdemucs window geometry, a forward that costs nothing)")
    lines = [f"- song: {args.seconds:.0f} s music-like test signal (MP3 320 kbps), shifts "
             f"{args.shifts}, model: {model}, "
             f"windows_in_flight {args.windows_in_flight}, machine CPUs {os.cpu_count()}"]
    for cpus in args.encode_cpus:
        lines += run(args, cpus, data)
    for line in lines:
        print(line)
    append_results(f"Overhead: everything but the model ({args.seconds:.0f} s song, shifts "
                   f"{args.shifts}{', full model' if args.full else ''})", lines)


if __name__ == "__main__":
    main()
