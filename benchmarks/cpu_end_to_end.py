"""CPU, whole process each: `python -m serve_graph separate` vs `python -m demucs.separate`.

Same 60 s stereo WAV, same local model repo (full-size htdemucs architecture, random weights),
4 stems as MP3 at 192 kbps, shifts 1, overlap 0.25. Runs alternate: reference, ours, ours with
SERVE_GRAPH_CPU_TUNING=0 (the code before the CPU tuning), repeated. Our runs print seconds per
stage (--profile). The residual of our fp32 path against `Separator.separate_tensor` is
measured in the same run on a 15 s excerpt with the same seed. Appends to RESULTS.md.

    python -m benchmarks.cpu_end_to_end --seconds 60 --repeats 2
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch as th
from demucs.api import Separator

from benchmarks.common import append_results, full_size_repo, song
from benchmarks.engine_vs_reference import residual_db
from serve_graph.engine import ModelRunner, load_model, separate
from serve_graph.engine.output import encode_stem


def timed_run(cmd, env) -> tuple:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed: {proc.stderr[-2000:]}")
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    return elapsed, (json.loads(last) if last.startswith("{") else {})


def excerpt_residual(repo: Path, mix: th.Tensor, precision: str) -> float:
    reference = Separator("htdemucs", repo=repo, device="cpu", shifts=1, overlap=0.25,
                          progress=False)
    random.seed(0)
    ref = th.stack(list(reference.separate_tensor(mix)[1].values()))
    runner = ModelRunner(load_model("htdemucs", repo), "cpu", precision)
    return residual_db(separate(runner, mix, shifts=1, overlap=0.25, seed=0), ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    repo = full_size_repo()
    work = Path(tempfile.mkdtemp(prefix="cpu_e2e_"))
    wav_path = work / "song.wav"
    mix = song(args.seconds)
    wav_path.write_bytes(encode_stem(mix, 44100, "wav"))
    env = dict(os.environ)
    reference_cmd = [sys.executable, "-m", "demucs.separate", "--repo", str(repo), "-n",
                     "htdemucs", "--mp3", "--mp3-bitrate", "192", "-o", str(work / "ref"),
                     str(wav_path)]
    ours_cmd = [sys.executable, "-m", "serve_graph", "separate", str(wav_path), "-o",
                str(work / "stems.zip"), "--model-repo", str(repo), "--precision",
                args.precision, "--no-progress", "--profile"]
    runs = {"reference": [], "ours": [], "ours_untuned": []}
    profiles = {"ours": [], "ours_untuned": []}
    for _ in range(args.repeats):
        runs["reference"].append(timed_run(reference_cmd, env)[0])
        for name, extra in (("ours", {}), ("ours_untuned", {"SERVE_GRAPH_CPU_TUNING": "0"})):
            elapsed, profile = timed_run(ours_cmd, dict(env, **extra))
            runs[name].append(elapsed)
            profiles[name].append(profile)
    best = {name: min(times) for name, times in runs.items()}
    residual = excerpt_residual(repo, mix[:, :15 * 44100], args.precision)

    def fmt(times):
        return ", ".join(f"{t:.1f}" for t in times)

    def stages(profile):
        return ", ".join(f"{k} {v:.2f}" for k, v in profile.items())

    append_results(
        f"CPU end to end, {args.seconds:.0f} s song, precision {args.precision}",
        ["- model: full-size htdemucs architecture, random weights, local model repo",
         f"- reference: `python -m demucs.separate --repo R -n htdemucs --mp3 --mp3-bitrate 192 "
         f"song.wav`: {fmt(runs['reference'])} s",
         f"- ours: `python -m serve_graph separate song.wav -o stems.zip --model-repo R "
         f"--precision {args.precision}`: {fmt(runs['ours'])} s",
         f"- ours before the CPU tuning (SERVE_GRAPH_CPU_TUNING=0): "
         f"{fmt(runs['ours_untuned'])} s",
         f"- ratio reference / ours (best of {args.repeats}): "
         f"{best['reference'] / best['ours']:.2f}x (before tuning: "
         f"{best['reference'] / best['ours_untuned']:.2f}x)",
         f"- residual of our {args.precision} path vs `Separator.separate_tensor` (15 s excerpt, "
         f"same seed): {residual:.1f} dB",
         f"- our stages, tuned (s): {stages(profiles['ours'][-1])}",
         f"- our stages, before tuning (s): {stages(profiles['ours_untuned'][-1])}"])


if __name__ == "__main__":
    main()
