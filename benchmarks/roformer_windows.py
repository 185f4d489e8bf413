"""RoFormer windows at full size: seconds and GFLOP per window of viperx's BS-RoFormer ep_317
and Kim's Mel-Band RoFormer vocals (the published configs, random weights), beside a window of
the full-size htdemucs measured in the same run. GFLOP are the matrix products that
`torch.utils.flop_counter` counts (`Roformer.window_gflop`; htdemucs' counted on its forward).
Appends to RESULTS.md.

    python -m benchmarks.roformer_windows                      # CPU, fp32, one window each
    python -m benchmarks.roformer_windows --device cuda --precision bf16 --batch-size 8
"""
import argparse
import time
import typing as tp

import torch as th
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import append_results
from serve_graph.engine import roformer_files
from serve_graph.engine.models import HTDEMUCS_WINDOW_GFLOP, random_model, roformer_geometry
from serve_graph.engine.roformer import RoformerSeparator
from serve_graph.engine.roformer_config import read_config
from serve_graph.engine.separator import ModelRunner, RunnerOptions

HTDEMUCS_WINDOW = 343980  # samples: 7.8 s at 44.1 kHz


def htdemucs_gflop() -> float:
    """The full-size htdemucs window's GFLOP, counted on one forward."""
    counter = FlopCounterMode(display=False)
    with counter, th.inference_mode():
        random_model("full")(th.zeros(1, 2, HTDEMUCS_WINDOW))
    return counter.get_total_flops() / 1e9


def seconds_per_window(runner: ModelRunner, length: int, batch: int, repeats: int,
                       warmups: int) -> float:
    windows = th.randn(batch, 2, length)
    for _ in range(warmups):
        runner(0, windows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(0, windows)
        times.append(time.perf_counter() - start)
    return min(times) / batch


def measure(model: th.nn.Module, length: int, gflop: float, args) -> tp.Dict[str, float]:
    options = RunnerOptions(args.device, args.precision, max_batch=args.batch_size)
    runner = ModelRunner(model, options=options)
    seconds = seconds_per_window(runner, length, args.batch_size, args.repeats, args.warmups)
    return {"seconds": seconds, "gflop": gflop, "rate": gflop / seconds,
            "x_real_time": length / 44100 / seconds}


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmups", type=int, default=0, help="untimed forwards first")
    parser.add_argument("--folder", default="/tmp/roformer_windows")
    args = parser.parse_args(argv)
    counted = htdemucs_gflop()
    rows = {"htdemucs (full size)": measure(random_model("full"), HTDEMUCS_WINDOW, counted,
                                            args)}
    print("htdemucs", rows["htdemucs (full size)"], flush=True)
    for family, label in (("bs_roformer", "BS-RoFormer, viperx ep_317"),
                          ("mel_band_roformer", "Mel-Band RoFormer, Kim vocals")):
        path = roformer_files.write_config(f"{args.folder}/{family}.yaml",
                                           roformer_files.TEMPLATES[family])
        config = read_config(path)
        model = RoformerSeparator(roformer_files.random_model(config))
        gflop = model.roformer.window_gflop(config.chunk_size)
        rows[label] = measure(model, config.chunk_size, gflop, args)
        rows[label]["cost"] = roformer_geometry(model).window_cost
        print(label, rows[label], flush=True)
        del model
    base = rows["htdemucs (full size)"]
    lines = [f"- {args.device}, {args.precision}, batch {args.batch_size}, best of "
             f"{args.repeats} after {args.warmups} warm-up(s); htdemucs' window counted "
             f"{counted:.2f} GFLOP (the budget's unit, `HTDEMUCS_WINDOW_GFLOP`, is "
             f"{HTDEMUCS_WINDOW_GFLOP})",
             "", "| model | window | GFLOP | s / window | GFLOP/s | × real time | "
             "cost (budget, GFLOP ratio) | time vs htdemucs |", "| --- | ---: | ---: | ---: | "
             "---: | ---: | ---: | ---: |"]
    for label, row in rows.items():
        length = HTDEMUCS_WINDOW if label.startswith("htdemucs") else 352800
        lines.append(f"| {label} | {length / 44100:.1f} s | {row['gflop']:.0f} | "
                     f"{row['seconds']:.2f} | {row['rate']:.0f} | {row['x_real_time']:.2f} | "
                     f"{row.get('cost', 1.):.1f} | {row['seconds'] / base['seconds']:.1f}× |")
    append_results("RoFormer windows at full size", lines)


if __name__ == "__main__":
    main()
