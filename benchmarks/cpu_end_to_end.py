"""CPU, whole processes: `python -m serve_graph separate` vs `python -m demucs.separate` (and
audio-separator), same weights, same song.

Full-size htdemucs architecture with random weights in a local model repo, one stereo song,
4 stems (WAV by default), shifts 1, overlap 0.25. Runs alternate in rounds: the reference,
ours with the CPU settings chosen for this machine ("auto"), ours with PyTorch's defaults
(`SERVE_GRAPH_CPU_TUNING=off`, the settings `demucs.separate` runs with), each `--variant
NAME=SETTINGS` (a `SERVE_GRAPH_CPU_TUNING` value), ours in bf16 where this CPU has it, and
audio-separator where `--audio-separator EXE` names its command (installed in its own
environment; given the same weights through a local model folder). Each process's wall, user
and system seconds (`os.wait4`); medians over the rounds, ratios to the reference's median.
The residuals of our fp32 and bf16 paths against `Separator.separate_tensor` are measured on a
15 s excerpt with the same seed. Appends to RESULTS.md with the CPU flags and THP modes.

    python -m benchmarks.cpu_end_to_end --seconds 60 --repeats 3 \
        [--audio-separator /path/to/venv/bin/audio-separator] [--variant passive=omp_wait=passive]
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import torch as th
from demucs.api import Separator

from benchmarks.common import append_results, full_size_repo, song
from benchmarks.engine_vs_reference import residual_db
from serve_graph.engine import ModelRunner, load_model, separate
from serve_graph.engine.cpu_settings import Machine, precision_problem
from serve_graph.engine.output import encode_stem

EXCERPT_S = 15
Run = tp.Tuple[float, float, float]  # wall, user, system seconds


def timed_run(cmd: tp.List[str], env: tp.Dict[str, str], log: Path) -> Run:
    """Run `cmd` to its end; its wall, user and system seconds (its children's included)."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {log.read_text()[-2000:]}")
    return wall, usage.ru_utime, usage.ru_stime


def audio_separator_repo(repo: Path, work: Path) -> Path:
    """A model folder audio-separator accepts offline: our repo's files and the model list it
    would otherwise download, naming htdemucs' two files."""
    folder = work / "audio_separator_models"
    folder.mkdir()
    files = {}
    for path in repo.iterdir():
        (folder / path.name).symlink_to(path)
        files[path.name] = path.name
    lists = ("vr_download_list", "mdx_download_list", "mdx_download_vip_list",
             "mdx23c_download_list", "mdx23c_download_vip_list", "roformer_download_list")
    checks = {name: {} for name in lists}
    checks["demucs_download_list"] = {"Demucs v4: htdemucs": files}
    (folder / "download_checks.json").write_text(json.dumps(checks))
    return folder


def commands(args, repo: Path, work: Path, wav: Path) -> tp.Dict[str, tp.Tuple[list, dict]]:
    """Each contender's command line and environment additions, in the order they run."""
    ours = [sys.executable, "-m", "serve_graph", "separate", str(wav), "-o",
            str(work / "stems.zip"), "--model-repo", str(repo), "--format", args.format,
            "--no-progress", "--profile"]
    runs = {"reference": ([sys.executable, "-m", "demucs.separate", "--repo", str(repo), "-n",
                           "htdemucs", "-o", str(work / "ref"), str(wav)]
                          + (["--mp3", "--mp3-bitrate", "192"] if args.format == "mp3" else []),
                          {}),
            "ours": (ours, {"SERVE_GRAPH_CPU_TUNING": "auto"}),
            "ours, PyTorch defaults": (ours, {"SERVE_GRAPH_CPU_TUNING": "off"})}
    for variant in args.variant:
        name, _, value = variant.partition("=")
        runs[f"ours, {value}"] = (ours, {"SERVE_GRAPH_CPU_TUNING": value})
    if precision_problem("bf16") is None:
        runs["ours, bf16"] = (ours + ["--precision", "bf16"], {"SERVE_GRAPH_CPU_TUNING": "auto"})
    if args.audio_separator:
        models = audio_separator_repo(repo, work)
        runs["audio-separator"] = ([args.audio_separator, str(wav), "-m", "htdemucs.yaml",
                                    "--model_file_dir", str(models), "--output_dir",
                                    str(work / "as"), "--output_format", args.format,
                                    "--demucs_shifts", "1", "--demucs_overlap", "0.25"], {})
    return runs


def excerpt_residuals(repo: Path, mix: th.Tensor) -> tp.Dict[str, float]:
    """Our fp32 (and bf16 where this CPU has it) against `separate_tensor`, same seed."""
    reference = Separator("htdemucs", repo=repo, device="cpu", shifts=1, overlap=0.25,
                          progress=False)
    random.seed(0)
    ref = th.stack(list(reference.separate_tensor(mix)[1].values()))
    precisions = ["fp32"] + (["bf16"] if precision_problem("bf16") is None else [])
    return {precision: residual_db(separate(ModelRunner(load_model("htdemucs", repo), "cpu",
                                                        precision), mix, 1, 0.25, 0), ref)
            for precision in precisions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", default="wav", choices=("wav", "mp3"))
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=SETTINGS: also run ours with SERVE_GRAPH_CPU_TUNING=SETTINGS")
    parser.add_argument("--audio-separator", help="audio-separator's command (its own venv)")
    args = parser.parse_args()

    repo = full_size_repo()
    work = Path(tempfile.mkdtemp(prefix="cpu_e2e_"))
    wav = work / "song.wav"
    mix = song(args.seconds)
    wav.write_bytes(encode_stem(mix, 44100, "wav"))
    runs = commands(args, repo, work, wav)
    times: tp.Dict[str, tp.List[Run]] = {name: [] for name in runs}
    for round_index in range(args.repeats):
        for name, (cmd, extra) in runs.items():
            times[name].append(timed_run(cmd, dict(os.environ, **extra), work / "run.log"))
            print(f"round {round_index + 1} {name}: {times[name][-1]}", flush=True)
    residuals = excerpt_residuals(repo, mix[:, :EXCERPT_S * 44100])
    machine = Machine.read()
    append_results(f"CPU end to end, {args.seconds:.0f} s song to {args.format.upper()}",
                   report(args, times, residuals, machine))


def report(args, times: tp.Dict[str, tp.List[Run]], residuals: tp.Dict[str, float],
           machine: Machine) -> tp.List[str]:
    median = {name: [statistics.median(run[i] for run in runs) for i in range(3)]
              for name, runs in times.items()}
    reference = median["reference"][0]
    simd = " ".join(sorted(f for f in machine.flags if f.startswith(("avx2", "avx512", "amx"))))
    lines = ["- model: full-size htdemucs architecture, random weights, local model repo; "
             f"shifts 1, overlap 0.25, {args.repeats} alternated rounds",
             f"- CPU: {machine.kind} ({simd}), {machine.cores} cores; THP "
             f"enabled={machine.thp_enabled} defrag={machine.thp_defrag}",
             "", "| run | wall (median) | user | system | reference / this | walls |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, (wall, user, system) in median.items():
        walls = ", ".join(f"{run[0]:.1f}" for run in times[name])
        lines.append(f"| {name} | {wall:.1f} s | {user:.1f} s | {system:.1f} s | "
                     f"{reference / wall:.2f}x | {walls} |")
    lines += ["", "- residual vs `Separator.separate_tensor` (15 s excerpt, same seed): "
              + ", ".join(f"{p} {r:.1f} dB" for p, r in residuals.items())]
    return lines


if __name__ == "__main__":
    main()
