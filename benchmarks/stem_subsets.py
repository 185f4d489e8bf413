"""What a stem subset saves on a bag of specialists (htdemucs_ft's shape: four full-size
HTDemucs, each weighted on one stem), against `demucs.api.Separator`, which runs all four.

Random weights, the compute of the real bag. For each subset, our engine plans only the models
that weigh on it (`ModelGeometry.models_for`); the reference runs once and every subset after
it in the same process, and each subset's stems are checked against the reference's.

    python -m benchmarks.stem_subsets --seconds 15
"""
import argparse
import random
import time

import torch as th
from demucs.api import Separator

from benchmarks.common import CACHE, append_results, song
from benchmarks.engine_vs_reference import residual_db
from serve_graph.engine import ModelRunner, load_model, make_random_repo, plan_windows, separate

SPECIALISTS = [[1., 0., 0., 0.], [0., 1., 0., 0.], [0., 0., 1., 0.], [0., 0., 0., 1.]]
SUBSETS = (None, ("vocals", "drums"), ("vocals",))


def specialist_bag():
    """A model repo with bag `htdemucs_ft` of four full-size random HTDemucs, cached."""
    repo = CACHE / "htdemucs_ft_random"
    if not (repo / "htdemucs_ft.yaml").is_file():
        make_random_repo(repo, "htdemucs_ft", size="full", num_models=4, weights=SPECIALISTS)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    repo = specialist_bag()
    mix = song(args.seconds)
    reference = Separator("htdemucs_ft", repo=repo, device="cpu", shifts=1, progress=False)
    runner = ModelRunner(load_model("htdemucs_ft", repo), "cpu")
    geometry = runner.geometry
    random.seed(args.seed)
    start = time.perf_counter()
    ref = reference.separate_tensor(mix)[1]
    ref_seconds = time.perf_counter() - start
    lines = [f"- bag: 4 full-size htdemucs (random weights), one specialist per stem as "
             f"htdemucs_ft; {args.seconds:.0f} s stereo, shifts 1, overlap 0.25",
             f"- reference `Separator.separate_tensor` (always the four models): "
             f"{ref_seconds:.2f} s"]
    for stems in SUBSETS:
        models = geometry.models_for(stems)
        plan = plan_windows(mix.shape[-1], geometry, shifts=1, seed=args.seed, models=models)
        start = time.perf_counter()
        ours = separate(runner, mix, plan=plan)
        seconds = time.perf_counter() - start
        names = stems or geometry.sources
        worst = max(residual_db(ours[geometry.sources.index(name)][None], ref[name][None])
                    for name in names)
        lines.append(f"- ours, stems={','.join(stems) if stems else 'all'}: {len(models)} of 4 "
                     f"models, {len(plan.windows)} windows, {seconds:.2f} s "
                     f"({ref_seconds / seconds:.2f}x the reference), residual {worst:.1f} dB")
    append_results(f"Stem subsets on a bag of specialists ({args.seconds:.0f} s)", lines)


if __name__ == "__main__":
    main()
