"""The GPU run's results (`benchmarks/gpu_run.sh RESULTS_DIR`) as a RESULTS.md section: the
machine, each step's exit and time, every figure with its goal met or not, and issue #24's and
#25's targets read from them. The GPU's minutes are few; the session after them writes this.

    python -m benchmarks.gpu_report RESULTS_DIR            # print the section
    python -m benchmarks.gpu_report RESULTS_DIR --append   # and append it to RESULTS.md
"""
import argparse
import datetime
import json
import re
import typing as tp
from pathlib import Path

from benchmarks.common import RESULTS

Figure = tp.Dict[str, tp.Any]
# what a figure's row shows besides its value (the rest of its details are long: timings)
SHOWN = ("precision", "variant", "batch", "mp3_quality", "family", "songs", "wall_s", "p50_s",
         "windows", "gpu_seconds", "mp3_cpu_seconds", "residual_db_vs_fp32", "pipeline_s",
         "tflops")
STEP_LINE = re.compile(r"^== (\w+)(?: \(at most (\d+) s\)|: exit (\d+)) (\d\d:\d\d:\d\d)$")


def read(results: Path) -> tp.Tuple[tp.List[Figure], tp.Dict[str, dict]]:
    """The figures in the order measured, and each step's limit, exit status and seconds from
    log.txt (a step with no exit line did not end)."""
    figures_file, log = results / "figures.jsonl", results / "log.txt"
    figures = ([json.loads(line) for line in figures_file.read_text().splitlines()]
               if figures_file.is_file() else [])
    steps: tp.Dict[str, dict] = {}
    for line in (log.read_text().splitlines() if log.is_file() else []):
        match = STEP_LINE.match(line)
        if not match:
            continue
        step, limit, status, clock = match.groups()
        at = datetime.datetime.strptime(clock, "%H:%M:%S")
        if limit is not None:
            steps[step] = {"limit": int(limit), "start": at, "exit": None, "seconds": None}
        elif step in steps:
            seconds = (at - steps[step]["start"]).total_seconds() % 86400
            steps[step].update(exit=int(status), seconds=seconds)
    return figures, steps


def met(value: tp.Any, goal: tp.Any) -> tp.Optional[bool]:
    """Whether `value` meets `goal` ("<= x", ">= x", or a value to equal); None: no goal."""
    if goal is None or value is None:
        return None
    if isinstance(goal, str) and goal[:2] in ("<=", ">="):
        bound = float(goal[2:])
        return value <= bound if goal.startswith("<=") else value >= bound
    return value == goal


def shown(value: tp.Any, unit: str = "") -> str:
    """A value as the tables show it: floats to 4 significant digits, with its unit."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".strip()


def verdict(value: tp.Any, goal: tp.Any) -> str:
    return {True: "met", False: "**not met**", None: ""}[met(value, goal)]


def figure_row(figure: Figure) -> str:
    detail = ", ".join(f"{key} {shown(figure[key])}" for key in SHOWN if key in figure)
    goal = (f"{figure['goal']} ({verdict(figure['value'], figure['goal'])})"
            if "goal" in figure else "")
    return (f"| {figure['step']} | {figure['name']} | {shown(figure['value'], figure['unit'])} "
            f"| {detail} | {goal} |")


def targets(figures: tp.List[Figure]) -> tp.List[str]:
    """Issue #24's and #25's targets, each with the figure that decides it."""
    lines = []
    residual = {(f["precision"], f["variant"]): f["value"] for f in figures
                if f["name"] == "residual_db"}
    close = [f for f in figures if f["name"] == "ms_per_window" and
             residual.get((f["precision"], f["variant"]), 0) <= -60]
    if close:
        best = min(close, key=lambda f: f["value"])
        lines.append(f"- model <= 3 ms a window at <= -60 dB: {shown(best['value'], 'ms')} "
                     f"({best['precision']} {best['variant']}, batch {best['batch']}): "
                     f"{verdict(best['value'], '<= 3')}")
    mp3 = [f for f in figures if f["name"].startswith("one_song_mp3")]
    if mp3:
        fast = [f for f in mp3 if f["value"] <= 1.0]
        careful = min((f["mp3_quality"] for f in fast), default=None)
        lines.append("- 216 s -> 4 MP3 stems <= 1.0 s: " + (
            f"met at LAME q{careful}, the most careful setting that meets it "
            if fast else "**not met** ") + "(" + ", ".join(
                f"q{f['mp3_quality']} {shown(f['value'], 's')}" for f in mp3) + ")")
    for name, goal, what in (("concurrent_wav_x_real_time", ">= 1500", "16 songs to WAV"),
                             ("usd_per_song_wav", "<= 0.001", "USD per song (WAV)"),
                             ("batch_model_busy_after_first_song", ">= 0.9",
                              "batch: model busy from the first song's end")):
        found = [f for f in figures if f["name"] == name]
        if found:
            lines.append(f"- {what} {goal}: {shown(found[-1]['value'], found[-1]['unit'])} "
                         f"({verdict(found[-1]['value'], goal)})")
    return lines


def section(results: Path, date: str) -> str:
    figures, steps = read(results)
    machine = {f["name"]: f for f in figures if f["step"] == "machine"}
    gpu = machine.get("gpu", {}).get("value", "unknown GPU")
    lines = [f"\n## GPU run (issue #24): {gpu}\n", f"- date: {date}",
             f"- machine: {gpu}; torch {machine.get('torch', {}).get('value')}, CUDA "
             f"{machine.get('cuda', {}).get('value')}, {machine.get('cpu_cores', {}).get('value')}"
             " CPU cores",
             "- command: `bash benchmarks/gpu_run.sh RESULTS_DIR` (`benchmarks/GPU_NOTES.md`)",
             "- steps: " + ", ".join(
                 f"{step} " + ("did not end" if info["exit"] is None else
                               f"exit {info['exit']} in {info['seconds']:.0f} s")
                 + f" (limit {info['limit']} s)" for step, info in steps.items()),
             "- targets:", *[f"  {line}" for line in targets(figures)], "",
             "| step | figure | value | detail | goal |", "| --- | --- | --- | --- | --- |",
             *[figure_row(f) for f in figures if f["step"] != "machine"]]
    return "\n".join(lines) + "\n"


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--append", action="store_true", help="append it to RESULTS.md")
    parser.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc)
                        .strftime("%Y-%m-%d"), help="the run's date (default: today, UTC)")
    args = parser.parse_args(argv)
    text = section(args.results, args.date)
    print(text)
    if args.append:
        with RESULTS.open("a") as out:
            out.write(text)


if __name__ == "__main__":
    main()
