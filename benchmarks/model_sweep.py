"""Model only: precision x batch size on one device, with the real-time factor of a song.

For each precision (fp32, tf32, bf16, fp16; autocast keeps STFT/iSTFT in fp32) and batch size,
times forward passes over full-size htdemucs windows (random weights), and reports seconds per
window, the model-only real-time factor for a `--song-seconds` song (shifts 1, overlap 0.25) and
the residual of that precision against fp32 on the same windows. Appends to RESULTS.md.

    python -m benchmarks.model_sweep --device cuda --song-seconds 216 --batch-sizes 1 4 8 16 32
"""
import argparse
import copy
import time

import torch as th

from benchmarks.common import append_results, full_size_repo, song
from serve_graph.engine import ModelRunner, load_model, plan_windows
from serve_graph.engine.windows import normalise, window_input


def sync(device: th.device) -> None:
    if device.type == "cuda":
        th.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if th.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--song-seconds", type=float, default=216.)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = load_model("htdemucs", full_size_repo())
    mix, _, _ = normalise(song(args.song_seconds))
    runner = ModelRunner(copy.deepcopy(model), args.device, "fp32")
    plan = plan_windows(mix.shape[-1], runner.geometry, shifts=1, overlap=0.25, seed=0)
    windows = th.stack([window_input(mix, w) for w in plan.windows[:max(args.batch_sizes)]])
    reference = runner(0, windows[:1]).cpu()
    lines = [f"- song {args.song_seconds:.0f} s = {len(plan.windows)} windows "
             f"(shifts 1, overlap 0.25), device {args.device}"]
    for precision in args.precisions:
        runner = ModelRunner(copy.deepcopy(model), args.device, precision)
        out = runner(0, windows[:1]).cpu()
        residual = 10 * th.log10(((out - reference) ** 2).sum() / (reference ** 2).sum())
        for batch_size in args.batch_sizes:
            batch = windows[:batch_size].to(runner.device)
            if args.device == "cuda":
                batch = batch.pin_memory() if batch.device.type == "cpu" else batch
            runner(0, batch)  # warm-up
            sync(runner.device)
            start = time.perf_counter()
            for _ in range(args.repeats):
                runner(0, batch)
            sync(runner.device)
            per_window = (time.perf_counter() - start) / (args.repeats * batch_size)
            rtf = args.song_seconds / (per_window * len(plan.windows))
            lines.append(f"- {precision} batch {batch_size}: {per_window * 1000:.1f} ms/window, "
                         f"model {rtf:.1f}x real time, residual vs fp32 {float(residual):.1f} dB")
    append_results(f"Model sweep on {args.device}", lines)


if __name__ == "__main__":
    main()
