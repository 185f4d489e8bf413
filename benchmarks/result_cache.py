"""The result cache over HTTP: the same song and options sent again, against a real `serve run`
with the cache on. For each output, the first request (a miss: the model runs, the answer is
kept) and then `--repeats` hits, wall time at the client and the service's `Server-Timing`.

    python -m benchmarks.result_cache --seconds 216
"""
import argparse
import statistics
import tempfile
import time
import typing as tp
from pathlib import Path

import requests

from benchmarks.common import append_results, song
from benchmarks.overhead import standin_repo
from benchmarks.throughput import start_service, stop_service
from serve_graph.engine.output import encode_stem
from serve_graph.launch import write_config


def timed(url: str, data: bytes, fields: dict) -> tp.Tuple[float, str, str, int]:
    """(seconds, X-Cache, Server-Timing, bytes) of one `POST /separate`."""
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("song.mp3", data)},
                             data=fields, timeout=1800)
    response.raise_for_status()
    return (time.perf_counter() - start, response.headers.get("X-Cache", ""),
            response.headers.get("Server-Timing", ""), len(response.content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=216.)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=8768)
    args = parser.parse_args()
    data = encode_stem(song(args.seconds, seed=7), 44100, "mp3", 192)
    folder = Path(tempfile.mkdtemp(prefix="result_cache_"))
    config = write_config(folder / "serve_config.yaml", port=args.port, host="127.0.0.1",
                          args={"model_repo": str(standin_repo()), "result_cache_mb": 2048,
                                "result_cache_dir": str(folder / "cache")})
    url, process = start_service(args, config)
    lines = [f"- one {args.seconds:.0f} s song (MP3 192 kbps in), stand-in model (htdemucs "
             f"geometry), shipped serve_config.yaml with the cache on; the first request of "
             f"each output runs the model, the next {args.repeats} are answered from the cache",
             "", "| output | miss: seconds | hits: seconds (median) | hit Server-Timing | "
             "answer MB |", "|---|---|---|---|---|"]
    try:
        for name, fields in (("4 MP3 stems", {}), ("4 WAV stems", {"format": "wav"})):
            miss = timed(url, data, fields)
            hits = [timed(url, data, fields) for _ in range(args.repeats)]
            assert miss[1] == "miss" and all(hit[1] == "hit" for hit in hits), (miss, hits)
            lines.append(f"| {name} | {miss[0]:.2f} | "
                         f"{statistics.median(hit[0] for hit in hits) * 1000:.0f} ms | "
                         f"{hits[-1][2]} | {miss[3] / 2**20:.1f} |")
            print(lines[-1], flush=True)
    finally:
        stop_service(process)
    append_results(f"Result cache, one {args.seconds:.0f} s song", lines)


if __name__ == "__main__":
    main()
