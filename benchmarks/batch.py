"""Batch mode against the HTTP service on the same songs and model: `python -m serve_graph batch`
on a folder of songs of mixed length, and the same songs POSTed to `/separate` by `--clients`
clients that save each song's stems to disk as the batch does (the service started beforehand,
not timed). Songs/hour, x real time, and the peak RSS of the batch's driver and of its largest
worker (sampled from /proc). The batch is timed whole (the command, Ray's start included) and
as its pipeline alone (from Ray up to the end, `_batch/runs/`): the HTTP service's start is
not timed, so the pipeline is the like-for-like figure. With `--model full` (the full-size
architecture, random weights) `python -m demucs.separate` runs the same files too, in one
process one after the other as it does (its WAV output is 16-bit: ask `--format wav`).

    python -m benchmarks.batch --songs 20 --format wav
    python -m benchmarks.batch --songs 20 --format wav --model full --lengths 5 10 15 20 30
"""
import argparse
import subprocess
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

from benchmarks.common import append_results, full_size_repo, song
from benchmarks.overhead import standin_repo
from benchmarks.throughput import run_requests, start_service, stop_service
from serve_graph.batch.output import BatchOutput
from serve_graph.engine.output import encode_stem
from serve_graph.launch import write_config
from serve_graph.procs import descendants, memory_mb

LENGTHS = (30., 60., 120., 180., 240.)  # seconds, cycled over the songs


def write_songs(folder: Path, count: int, lengths: tp.Sequence[float] = LENGTHS
                ) -> tp.Tuple[tp.List[bytes], float]:
    """`count` MP3s of `lengths` (cycled) in `folder`; their bytes and their total seconds."""
    songs, total = [], 0.
    for index in range(count):
        seconds = lengths[index % len(lengths)]
        data = encode_stem(song(seconds, seed=index), 44100, "mp3", 192)
        (folder / f"song{index:03d}.mp3").write_bytes(data)
        songs.append(data)
        total += seconds
    return songs, total


class RssSampler(threading.Thread):
    """The peak RSS (VmHWM, MB) of a process and, apart, of the largest of its descendants."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.driver, self.worker, self.done = pid, 0., 0., threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.driver = max(self.driver, memory_mb(self.pid).get("VmHWM", 0.))
            for child in descendants(self.pid):
                self.worker = max(self.worker, memory_mb(child).get("VmHWM", 0.))


def timed_process(command: tp.List[str]) -> tp.Tuple[float, RssSampler, str]:
    """Run `command`: its wall seconds, its RSS sampler, its stderr (raises when it fails)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    sampler = RssSampler(process.pid)
    sampler.start()
    _, err = process.communicate()
    sampler.done.set()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}): {err[-3000:]}")
    return time.perf_counter() - start, sampler, err


def run_batch(folder: Path, output: Path, repo: Path, args
              ) -> tp.Tuple[float, dict, RssSampler]:
    """The batch command on `folder`: its wall seconds, its run record (`_batch/runs/`), the
    RSS sampler."""
    wall, sampler, err = timed_process(
        [sys.executable, "-m", "serve_graph", "batch", str(folder), str(output),
         "--model-repo", str(repo), "--format", args.format,
         "--songs-per-call", str(args.songs_per_call), "--batch-size", str(args.batch_size),
         "--calls-per-actor", str(args.calls_per_actor)])
    print(err.strip().splitlines()[-1], flush=True)
    run, = BatchOutput(str(output)).runs()
    return wall, run, sampler


def run_demucs(folder: Path, output: Path, repo: Path) -> tp.Tuple[float, RssSampler]:
    """`python -m demucs.separate` on every song of `folder` (16-bit WAV stems)."""
    wall, sampler, _ = timed_process(
        [sys.executable, "-m", "demucs.separate", "--repo", str(repo), "-n", "htdemucs",
         "-o", str(output), *map(str, sorted(folder.iterdir()))])
    return wall, sampler


def rss(sampler: RssSampler) -> str:
    return f"peak RSS driver {sampler.driver:.0f} MB, largest worker {sampler.worker:.0f} MB"


def share(value: tp.Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--songs", type=int, default=20)
    parser.add_argument("--format", default="wav")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--songs-per-call", type=int, default=4)
    parser.add_argument("--batch-size", type=int, help="windows per forward (default: 8 with "
                        "the stand-in, 1 with the full model on CPU, as the CLI)")
    parser.add_argument("--model", choices=("standin", "full"), default="standin")
    parser.add_argument("--lengths", type=float, nargs="+", default=LENGTHS,
                        help="song lengths in seconds, cycled over the songs")
    parser.add_argument("--calls-per-actor", type=int, default=2)
    parser.add_argument("--port", type=int, default=8771)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batch_bench_"))
    (folder / "songs").mkdir()
    songs, audio = write_songs(folder / "songs", args.songs, args.lengths)
    full = args.model == "full"
    repo = full_size_repo() if full else standin_repo()
    args.batch_size = args.batch_size or (1 if full else 8)

    batch_wall, run, sampler = run_batch(folder / "songs", folder / "out", repo, args)
    pipeline = run["seconds"] - run["setup_seconds"]
    config = write_config(folder / "serve_config.yaml", port=args.port, host="127.0.0.1",
                          args={"model_repo": str(repo), "result_cache_mb": 0})
    url, process = start_service(args, config)
    try:
        http_wall, latencies, _, _ = run_requests(url, songs, args.clients,
                                                  {"format": args.format}, folder / "http")
    finally:
        stop_service(process)
    reference = run_demucs(folder / "songs", folder / "demucs", repo) if full else None

    def row(name: str, wall: float, note: str) -> str:
        return (f"| {name} | {wall:.1f} | {args.songs / wall * 3600:.0f} | "
                f"{audio / wall:.1f} | {note} |")
    cycle = "/".join(f"{seconds:.0f}" for seconds in args.lengths)
    model = ("full-size htdemucs, random weights, fp32" if full else
             "stand-in model (htdemucs geometry, a forward that costs nothing): everything but "
             "the model")
    lines = [f"- {args.songs} songs, MP3 in, {audio:.0f} s of audio ({cycle} s cycled), "
             f"{args.format} stems out; {model}", "",
             "| path | wall s | songs/hour | x real time | notes |", "|---|---|---|---|---|",
             row("batch (whole command: Ray start included)", batch_wall,
                 f"songs/call {args.songs_per_call}, calls/actor {args.calls_per_actor}, "
                 f"windows/forward {args.batch_size}; {rss(sampler)}"),
             row("batch, its pipeline (from Ray up)", pipeline,
                 f"the same run; model busy {run['model_busy']:.0%} of it, "
                 f"{share(run.get('model_busy_after_first_song'))} from the first song's end "
                 f"to the last's"),
             row(f"HTTP service, {args.clients} clients (started beforehand)", http_wall,
                 f"shipped serve_config.yaml; stems saved to disk; p50 latency "
                 f"{latencies[len(latencies) // 2]:.1f} s"),
             *([row("`python -m demucs.separate` on the same files", reference[0],
                    f"one process, songs one after the other; {rss(reference[1])}")]
               if reference else []),
             "", f"- batch / HTTP throughput: pipeline {http_wall / pipeline:.2f}x, whole "
             f"command {http_wall / batch_wall:.2f}x"
             + (f"; batch (whole command) / demucs.separate: {reference[0] / batch_wall:.2f}x"
                if reference else "")]
    print("\n".join(lines), flush=True)
    append_results(f"Batch mode vs the HTTP service, {args.songs} songs"
                   + (", full-size model" if full else ""), lines)


if __name__ == "__main__":
    main()
