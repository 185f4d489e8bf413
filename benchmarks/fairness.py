"""Fair sharing: a short song's latency while a song at the full window budget is being
separated, against its latency on the idle service (goal: within 3x). Full-size model (random
weights) on this machine's CPU, real `serve run` on 127.0.0.1; the big request's client leaves
at the end, which cancels its remaining windows.

    python -m benchmarks.fairness --short 10 --repeats 2
"""
import argparse
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchmarks.common import append_results, full_size_repo, song
from benchmarks.throughput import start_service, stop_service
from serve_graph.engine.output import encode_stem
from serve_graph.launch import write_config


def post(url: str, data: bytes, timeout: float, **fields) -> float:
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("s.mp3", data)},
                             data=fields, timeout=timeout)
    response.raise_for_status()
    return time.perf_counter() - start


def big_request(url: str, data: bytes, shifts: int, leave_after: float) -> None:
    """The full-budget song; its client leaves after `leave_after` seconds."""
    try:
        post(url, data, leave_after, shifts=shifts)
    except requests.RequestException:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=float, default=10., help="seconds of the short song")
    parser.add_argument("--big", type=float, default=600., help="seconds of the big song")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=8768)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fairness_"))
    max_windows = 600
    config = write_config(folder / "serve_config.yaml", port=args.port, host="127.0.0.1",
                          args={"model_repo": str(full_size_repo()),
                                "max_windows": max_windows,
                                "result_cache_mb": 0})  # every request runs the model
    short = encode_stem(song(args.short, seed=1), 44100, "mp3", 192)
    big = encode_stem(song(args.big, seed=2), 44100, "mp3", 192)
    shifts = 5  # 600 s x 5 shifts / 5.85 s stride: ~515 windows, within the 600 budget
    url, process = start_service(args, config)
    try:
        post(url, short, 600)  # warm-up
        idle = [post(url, short, 600) for _ in range(args.repeats)]
        client = threading.Thread(target=big_request,
                                  args=(url, big, shifts, 60 + 60 * args.repeats))
        client.start()
        time.sleep(15)  # the big song's windows are running
        stats = requests.get(url + "/stats", timeout=30).json()
        loaded = [post(url, short, 600) for _ in range(args.repeats)]
        after = requests.get(url + "/stats", timeout=30).json()
        client.join()
    finally:
        stop_service(process)
    ratio = min(loaded) / min(idle)
    lines = [f"- short song {args.short:.0f} s (MP3 out), big song {args.big:.0f} s at shifts "
             f"{shifts} (budget {max_windows} windows), full-size model on CPU, shipped config "
             f"(windows_in_flight 2, max_batch_size 1)",
             f"- idle latency: {', '.join(f'{t:.1f}' for t in idle)} s",
             f"- latency while the big song runs: {', '.join(f'{t:.1f}' for t in loaded)} s "
             f"(**{ratio:.2f}x** idle, best of each; goal <= 3x); Separate ran "
             f"{after['windows'] - stats['windows']} windows meanwhile"]
    for line in lines:
        print(line)
    append_results("Fair sharing: short song beside a full-budget one", lines)


if __name__ == "__main__":
    main()
