"""Our engine vs `demucs.api.Separator.separate_tensor`, same model, same input, one process.

Full-size htdemucs architecture with random weights (the compute of the real model), a stereo
test song, shifts/overlap as given; runs alternate (reference, ours, ...) so both see the same
machine state. Reports both times, the ratio and the residual, and appends them to RESULTS.md.

    python -m benchmarks.engine_vs_reference --seconds 30 --repeats 1
"""
import argparse
import random
import time

import torch as th
from demucs.api import Separator

from benchmarks.common import append_results, full_size_repo, song
from serve_graph.engine import ModelRunner, load_model, separate
from serve_graph.engine.cpu_settings import choose


def residual_db(ours: th.Tensor, ref: th.Tensor) -> float:
    error = ((ours - ref) ** 2).sum(dim=(-1, -2))
    return float((10 * th.log10(error.clamp_min(1e-30) / (ref ** 2).sum(dim=(-1, -2)))).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.)
    parser.add_argument("--shifts", type=int, default=1)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    repo = full_size_repo()
    mix = song(args.seconds)
    reference = Separator("htdemucs", repo=repo, device="cpu", shifts=args.shifts,
                          overlap=args.overlap, progress=False)
    runner = ModelRunner(load_model("htdemucs", repo), "cpu", args.precision)
    ref_times, our_times = [], []
    for _ in range(args.repeats):
        random.seed(args.seed)
        th.backends.mha.set_fastpath_enabled(True)  # the reference as it runs by default
        start = time.perf_counter()
        ref = th.stack(list(reference.separate_tensor(mix)[1].values()))
        ref_times.append(time.perf_counter() - start)
        # ours, with the attention path ModelRunner picks for this CPU
        th.backends.mha.set_fastpath_enabled(choose(args.precision).attention == "fast-path")
        start = time.perf_counter()
        ours = separate(runner, mix, args.shifts, args.overlap, args.seed, args.batch_size)
        our_times.append(time.perf_counter() - start)
    ref_best, our_best = min(ref_times), min(our_times)
    append_results(
        f"Engine vs reference separate_tensor ({args.seconds:.0f} s, precision {args.precision})",
        ["- model: full-size htdemucs architecture, random weights (41.98 M parameters)",
         f"- input: {args.seconds:.0f} s stereo, shifts {args.shifts}, overlap {args.overlap}, "
         f"batch size {args.batch_size}",
         f"- reference `Separator.separate_tensor`: {', '.join(f'{t:.2f}' for t in ref_times)} s",
         f"- ours `serve_graph.engine.separate`: {', '.join(f'{t:.2f}' for t in our_times)} s",
         f"- ratio (reference / ours, best of {args.repeats}): {ref_best / our_best:.2f}x",
         f"- residual vs reference: {residual_db(ours, ref):.1f} dB (worst stem)",
         "- one process: the reference runs with PyTorch's default attention fast path; the "
         "process-wide CPU settings (memory, OpenMP) are PyTorch's defaults for both"])


if __name__ == "__main__":
    main()
