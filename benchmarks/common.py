"""Helpers shared by the benchmarks: the full-size random model repo, a test song, the machine
description and appending figures to benchmarks/RESULTS.md."""
import datetime
import os
import platform
import shlex
import sys
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch as th

from serve_graph.engine import make_random_repo
from serve_graph.engine.output import encode_stem

RESULTS = Path(__file__).with_name("RESULTS.md")
CACHE = Path(os.environ.get("SERVE_GRAPH_BENCH_CACHE", Path.home() / ".cache" / "serve_graph"))


def full_size_repo() -> Path:
    """A local model repo with bag `htdemucs` = one full-size HTDemucs with random weights
    (same architecture and compute as the pretrained model), created once and cached."""
    repo = CACHE / "htdemucs_random"
    if not (repo / "htdemucs.yaml").is_file():
        make_random_repo(repo, "htdemucs", size="full", seed=0)
    return repo


def song(seconds: float, samplerate: int = 44100, seed: int = 0) -> th.Tensor:
    """A music-like stereo test signal `[2, T]`: chords, a bass line, noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * samplerate)) / samplerate
    chord = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (261.6, 329.6, 392.0))
    bass = np.sin(2 * np.pi * 55 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
    hits = rng.standard_normal(t.shape) * (np.sin(2 * np.pi * 2 * t) > 0.95)
    mono = 0.1 * chord + 0.2 * bass + 0.3 * hits
    wav = np.stack([mono, np.roll(mono, 200)]) + 0.01 * rng.standard_normal((2, t.size))
    return th.from_numpy((0.5 * wav / np.abs(wav).max()).astype(np.float32))


def cycled_songs(seconds: float, fmt: str, count: int, distinct: int = 4) -> tp.List[bytes]:
    """`count` songs of `seconds` as `fmt` files (MP3 at 192 kbps), `distinct` of them
    (`song`, seeds 0...) cycled: different songs where a cache or a repeat could flatter a
    figure, encoded once each on every core (LAME takes ~4 CPU-s per 216 s song)."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        files = [encode_stem(song(seconds, seed=index), 44100, fmt, 192, pool=pool)
                 for index in range(min(count, distinct))]
    return [files[index % len(files)] for index in range(count)]


def cpu_flags() -> str:
    """The SIMD flags that decide CPU speed here: AVX2, AVX-512 (F, BF16, FP16), AMX."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
    return " ".join(flag for flag in wanted if flag in flags) or "none of AVX2/AVX-512/AMX"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {th.cuda.get_device_name()}" if th.cuda.is_available() else ""
    cpu += f" (flags: {cpu_flags()})"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, "
            f"torch {th.__version__}, {th.get_num_threads()} intra-op threads")


def append_results(title: str, lines) -> None:
    """Append a dated section with the machine and the exact command to RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    main = sys.modules["__main__"]
    module = main.__spec__.name if getattr(main, "__spec__", None) else sys.argv[0]
    command = "python -m " + " ".join(shlex.quote(a) for a in [module] + sys.argv[1:])
    text = [f"\n## {title}\n", f"- date: {now}", f"- machine: {machine()}",
            f"- command: `{command}`", *lines, ""]
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in `benchmarks/`; "
                           "newest last.\n")
    with RESULTS.open("a") as out:
        out.write("\n".join(text) + "\n")
    print("\n".join(text))
