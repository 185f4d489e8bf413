"""Does the batch pipeline keep a GPU's model busy? A CPU-only stand-in for issue #25's GPU
target (model busy >= 90 %): `python -m serve_graph batch` on 216 s FLAC songs to FLAC stems with
a *simulated accelerator* (`StandInModel(seconds_per_window=...)`: each forward waits a fixed
time per window without using a core, as a thread waits for a GPU), at several model speeds.

The run with 0 ms per window is the CPU-bound reference: the pipeline's time per song with a model
that costs nothing (decode, overlap-add, FLAC encoding, writing on this box's cores). The ratio
`CPU / model` of a run is that time over the model's seconds per song: on the 16-core GPU box,
FLAC in and out, it is ~0.5 for htdemucs in bf16 eager (9.3 ms x 37 windows = 0.34 s of model
per song against ~2.5 CPU-s of decoding, overlap-add and FLAC on ~14 cores: `GPU_NOTES.md`).
Below 1 the model is the bottleneck and a pipeline that overlaps its stages keeps it busy.

    python -m benchmarks.batch_busy --songs 12 --window-ms 0 110 70
"""
import argparse
import json
import shutil
import sys
import tempfile
import typing as tp
from pathlib import Path

from benchmarks.batch import timed_process
from benchmarks.common import CACHE, append_results, cycled_songs
from serve_graph.batch.output import BatchOutput
from serve_graph.engine.models import StandInModel, save_bag, save_checkpoint

def simulated_repo(window_ms: float) -> Path:
    """A model repo whose `htdemucs` is the stand-in waiting `window_ms` per window."""
    repo = CACHE / f"htdemucs_simulated_{window_ms:g}ms"
    if not (repo / "htdemucs.yaml").is_file():
        save_checkpoint(StandInModel(seconds_per_window=window_ms / 1000), repo, "simulated")
        save_bag(repo, "htdemucs", ["simulated"], None, None)
    return repo


def write_songs(folder: Path, count: int, seconds: float) -> float:
    """`count` FLAC songs of `seconds` in `folder` (four cycled); their seconds."""
    for index, data in enumerate(cycled_songs(seconds, "flac", count)):
        (folder / f"song{index:03d}.flac").write_bytes(data)
    return count * seconds


def run_batch(songs: Path, output: Path, window_ms: float, args) -> dict:
    """One batch run at `window_ms`: its run record (`_batch/runs/`)."""
    timed_process([sys.executable, "-m", "serve_graph", "batch", str(songs), str(output),
                   "--model-repo", str(simulated_repo(window_ms)), "--format", "flac",
                   "--batch-size", str(args.batch_size),
                   "--songs-per-call", str(args.songs_per_call)])
    run, = BatchOutput(str(output)).runs()
    shutil.rmtree(output)
    return run


def row(window_ms: float, run: dict, cpu_per_song: tp.Optional[float], songs: int) -> str:
    pipeline = run["seconds"] - run["setup_seconds"]
    model_per_song = run["model_seconds"] / songs
    ratio = (f"{cpu_per_song / model_per_song:.2f}" if cpu_per_song and model_per_song
             else "reference")
    after = run.get("model_busy_after_first_song")
    return (f"| {window_ms:g} | {model_per_song:.2f} | {ratio} | {pipeline:.1f} | "
            f"{run['audio_seconds'] / pipeline:.1f} | {run['model_busy']:.0%} | "
            + ("n/a" if after is None else f"{min(after, 1.):.0%}") + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--songs", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=216.)
    parser.add_argument("--window-ms", type=float, nargs="+", default=[0., 110., 70.],
                        help="the simulated model's milliseconds per window; 0 (the CPU-bound "
                        "reference) is run first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--songs-per-call", type=int, default=4)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batch_busy_"))
    try:
        (folder / "songs").mkdir()
        audio = write_songs(folder / "songs", args.songs, args.seconds)
        runs = {ms: run_batch(folder / "songs", folder / "out", ms, args)
                for ms in sorted(set(args.window_ms) | {0.})}
    finally:
        shutil.rmtree(folder)
    for ms, run in runs.items():
        print(ms, json.dumps(run), flush=True)
    reference = runs[0.]
    cpu_per_song = (reference["seconds"] - reference["setup_seconds"]) / args.songs
    lines = [f"- {args.songs} FLAC songs of {args.seconds:g} s ({audio:.0f} s), FLAC stems out; "
             f"windows/forward {args.batch_size}, songs/call {args.songs_per_call}, the "
             f"defaults otherwise (1 model actor, 2 calls at once); the model: the stand-in "
             f"waiting the given time per window without using a core",
             f"- CPU-bound reference (0 ms): {cpu_per_song:.2f} s of pipeline per song", "",
             "| ms/window | model s/song | CPU / model | pipeline s | x real time | model busy "
             "(pipeline) | model busy, first song's end to last's |",
             "|---|---|---|---|---|---|---|",
             *(row(ms, run, None if ms == 0 else cpu_per_song, args.songs)
               for ms, run in runs.items())]
    print("\n".join(lines), flush=True)
    append_results(f"Batch mode with a simulated accelerator, {args.songs} songs", lines)


if __name__ == "__main__":
    main()
