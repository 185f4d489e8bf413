"""What each output format costs: one stereo stem of a music-like signal encoded whole, on one
thread, by each encoder the service offers (`output.encode_stem`: MP3 by LAME at Demucs'
quality 2 and at `mp3_quality` 5 and 7, FLAC, AAC and Opus by FFmpeg through PyAV, WAV). On a
GPU box the encoders, not the model, are most of a request's CPU-seconds (4 stems per song).

    python -m benchmarks.codecs --seconds 216 --repeats 3
"""
import argparse
import time

import torch as th

from benchmarks.common import append_results, song
from serve_graph.engine.output import encode_stem

CASES = (("mp3", 192, 2), ("mp3", 192, 5), ("mp3", 192, 7), ("m4a", 256, 0),  # format, kbps,
         ("m4a", 128, 0), ("opus", 160, 0), ("opus", 96, 0), ("flac", 0, 0),  # LAME's quality
         ("wav", 0, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=216.)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    th.set_num_threads(1)
    stem = song(args.seconds)
    lines = [f"- one stereo {args.seconds:g} s stem (`benchmarks.common.song`), one thread, "
             f"best of {args.repeats}; CPU-seconds per 4-stem song = 4 x seconds", "",
             "| format | kbps | seconds | x real time | 4-stem song, CPU-s | file MB |",
             "|---|---|---|---|---|---|"]
    for fmt, kbps, quality in CASES:
        best, size = float("inf"), 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            size = len(encode_stem(stem, 44100, fmt, kbps, quality=quality or 2))
            best = min(best, time.perf_counter() - start)
        name = f"{fmt} q{quality}" if fmt == "mp3" else fmt
        lines.append(f"| {name} | {kbps or '—'} | {best:.2f} | {args.seconds / best:.0f} | "
                     f"{4 * best:.1f} | {size / 1e6:.1f} |")
    append_results(f"Encoders, one {args.seconds:g} s stem", lines)


if __name__ == "__main__":
    main()
