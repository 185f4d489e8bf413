"""Model only: precision x forward mode x batch size on one device, with a song's real-time factor.

For each precision (fp32, tf32, bf16, fp16; autocast keeps STFT/iSTFT in fp32) and forward mode
(eager, CUDA graphs, torch.compile + graphs), times batches of full-size htdemucs windows (random
weights) through `ModelRunner` (host -> device -> host included, as the service runs it), then a
whole `--song-seconds` song (all its windows in one call, cut into the runner's batches), and
the residual of the stems against the fp32 CPU engine on an excerpt. Appends to RESULTS.md.

    python -m benchmarks.model_sweep --device cuda --song-seconds 216 --batch-sizes 1 4 8 16 32
"""
import argparse
import copy
import gc
import statistics
import time
import typing as tp

import torch as th

from benchmarks.common import append_results, full_size_repo, song
from serve_graph.engine import ModelRunner, load_model, plan_windows, separate
from serve_graph.engine.separator import RunnerOptions
from serve_graph.engine.windows import normalise, window_input

EXCERPT_SECONDS = 20.


def sync(device: th.device) -> None:
    if device.type == "cuda":
        th.cuda.synchronize(device)


def timed(fn: tp.Callable[[], tp.Any], device: th.device, repeats: int,
          warmups: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmups` runs."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def residual_db(ours: th.Tensor, ref: th.Tensor) -> float:
    """Worst stem's error energy relative to the reference, dB."""
    error = ((ours - ref) ** 2).sum(dim=(-1, -2))
    return float((10 * th.log10(error.clamp_min(1e-30) / (ref ** 2).sum(dim=(-1, -2)))).max())


class Sweep:
    """The model, a song's windows and the CPU reference stems of an excerpt."""

    def __init__(self, device: str, song_seconds: float):
        self.device = th.device(device)
        self.model = load_model("htdemucs", full_size_repo())
        self.song_seconds = song_seconds
        mix, _, _ = normalise(song(song_seconds))
        geometry = ModelRunner(copy.deepcopy(self.model), "cpu").geometry
        plan = plan_windows(mix.shape[-1], geometry, shifts=1, overlap=0.25, seed=0)
        self.windows = th.stack([window_input(mix, w) for w in plan.windows])
        self.excerpt = song(EXCERPT_SECONDS, seed=1)
        start = time.perf_counter()
        self.reference = separate(ModelRunner(copy.deepcopy(self.model), "cpu"), self.excerpt,
                                  batch_size=4)
        self.reference_seconds = time.perf_counter() - start

    def runner(self, precision: str, compile: str, max_batch: int) -> ModelRunner:
        options = RunnerOptions(str(self.device), precision, compile, max_batch)
        return ModelRunner(copy.deepcopy(self.model), options=options)

    def batch(self, size: int) -> th.Tensor:
        """`size` windows of the song (repeated when it has fewer), pinned on CUDA."""
        repeats = -(-size // len(self.windows))
        windows = th.cat([self.windows] * repeats)[:size]
        return windows.pin_memory() if self.device.type == "cuda" else windows

    def measure(self, runner: ModelRunner, batch_sizes: tp.Sequence[int], repeats: int) -> dict:
        """ms per window at each batch size, the song's seconds and real-time factor, residual."""
        per_window = {}
        for size in batch_sizes:
            if size <= runner.batch_limit():
                batch = self.batch(size)
                per_window[size] = timed(lambda: runner(0, batch), self.device, repeats) / size
        windows = self.batch(len(self.windows))
        song_time = timed(lambda: runner(0, windows), self.device, repeats)
        stems = separate(runner, self.excerpt, batch_size=runner.batch_limit())
        best = min(per_window.values(), default=song_time / len(self.windows))
        return {"per_window": per_window, "song": song_time,
                "rtf": self.song_seconds / song_time,
                "throughput_rtf": self.song_seconds / (best * len(self.windows)),
                "residual": residual_db(stems, self.reference),
                "limit": runner.batch_limit(), "startup": runner.startup_seconds}

    def line(self, precision: str, compile: str, result: dict) -> str:
        sizes = ", ".join(f"b{size} {seconds * 1000:.2f}"
                          for size, seconds in result["per_window"].items())
        return (f"- {precision:>4} {compile:>7}: ms/window {sizes}; song "
                f"{len(self.windows)} windows in {result['song'] * 1000:.0f} ms = "
                f"**{result['rtf']:.0f}x real time** (at the best batch size: "
                f"{result['throughput_rtf']:.0f}x); residual vs fp32 CPU "
                f"{result['residual']:.1f} dB; batch limit {result['limit']}, start-up "
                f"{result['startup']:.1f} s")


def run_sweep(sweep: Sweep, precisions, modes, batch_sizes, repeats: int,
              rows: tp.Optional[tp.List[dict]] = None) -> tp.List[dict]:
    """Every precision x mode; returns `{precision, compile, **measure}` rows, appended to
    `rows` (when given) as each is measured, so that a run cut short keeps what it measured."""
    rows = [] if rows is None else rows
    for compile in modes:
        for precision in precisions:
            runner = sweep.runner(precision, compile, max(batch_sizes))
            row = {"precision": precision, "compile": compile,
                   **sweep.measure(runner, batch_sizes, repeats)}
            print(sweep.line(precision, compile, row), flush=True)
            rows.append(row)
            del runner
            gc.collect()  # the runner's forwards refer back to it: free its graphs' memory now
            if sweep.device.type == "cuda":
                th.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if th.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--modes", nargs="+", default=["none"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--song-seconds", type=float, default=216.)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sweep = Sweep(args.device, args.song_seconds)
    rows = run_sweep(sweep, args.precisions, args.modes, args.batch_sizes, args.repeats)
    append_results(f"Model sweep on {args.device}", [
        f"- song {args.song_seconds:.0f} s = {len(sweep.windows)} windows (shifts 1, overlap "
        f"0.25); residual on a {EXCERPT_SECONDS:.0f} s excerpt against the fp32 CPU engine",
        *[sweep.line(row["precision"], row["compile"], row) for row in rows]])


if __name__ == "__main__":
    main()
