"""Load: many clients at once against a real `serve run` on 127.0.0.1, optionally killing a
replica (SIGKILL) in the middle. Reports failed requests (the goal: none), p50/p95 latency,
each replica's RSS before and after, and whether the spill files and the object store are back
to their baseline afterwards.

    python -m benchmarks.load --clients 50 --requests 4 --seconds 20
    python -m benchmarks.load --clients 50 --requests 4 --seconds 20 --kill Separate --kill-after 20
"""
import argparse
import asyncio
import glob
import os
import signal
import tempfile
import time
import typing as tp
from pathlib import Path

import httpx
import requests

from benchmarks.common import append_results, song
from benchmarks.overhead import standin_repo
from benchmarks.throughput import percentile, start_service, stop_service
from serve_graph.engine.output import SPILL_ROOT, encode_stem
from serve_graph.launch import write_config
from serve_graph.procs import memory_mb, replica_pids

DEPLOYMENTS = ("Ingress", "Decode", "Separate", "Encode")


def rss_mb(pid: int) -> float:
    return memory_mb(pid).get("VmRSS", float("nan"))


def spill_files() -> int:
    """Spill files of the songs in flight (or left behind by a replica that died)."""
    return len(glob.glob(str(SPILL_ROOT / "*" / "stems-*" / "*")))


def object_store(url: str) -> dict:
    """The object store's use, from the service's /stats: {"bytes_used", "objects"}."""
    return requests.get(url + "/stats", timeout=60).json().get("object_store", {})


def describe_store(usage: dict) -> str:
    if "bytes_used" not in usage:
        return f"unknown ({usage})"
    return f"{usage['bytes_used'] / 2**20:.1f} MiB in {usage['objects']} objects"


async def store_settles(url: str, baseline: dict, timeout: float = 120.) -> str:
    """Wait until the object store holds no more objects than at `baseline`; say how long
    that took, or what is left after `timeout`."""
    start = time.perf_counter()
    while True:
        usage = object_store(url)
        if usage.get("objects", 0) <= baseline.get("objects", 0):
            return f"{describe_store(usage)}, back to baseline {time.perf_counter() - start:.0f} s after the last request"
        if time.perf_counter() - start > timeout:
            return f"{describe_store(usage)} still {timeout:.0f} s after the last request"
        await asyncio.sleep(2)


async def client(http: httpx.AsyncClient, url: str, songs: tp.List[bytes],
                 results: tp.List[tp.Tuple[int, float, str]]) -> None:
    for data in songs:
        start = time.perf_counter()
        try:
            response = await http.post(url + "/separate", files={"audio_file": ("s.mp3", data)})
            results.append((response.status_code, time.perf_counter() - start,
                            response.text[:200] if response.status_code != 200 else ""))
        except httpx.HTTPError as exc:
            results.append((0, time.perf_counter() - start, repr(exc)))


async def killer(service_pid: int, deployment: str, after: float, log: tp.List[str]) -> None:
    await asyncio.sleep(after)
    victim = replica_pids(service_pid)[deployment]
    os.kill(victim, signal.SIGKILL)
    killed = time.perf_counter()
    while replica_pids(service_pid).get(deployment) in (None, victim):
        await asyncio.sleep(0.2)
    log.append(f"  - SIGKILL of the {deployment} replica (pid {victim}) {after:.0f} s into the "
               f"run; a new replica was up {time.perf_counter() - killed:.1f} s later")


async def load(url: str, service_pid: int, args, songs: tp.List[bytes]) -> tuple:
    results: tp.List[tp.Tuple[int, float, str]] = []
    log: tp.List[str] = []
    timeout = httpx.Timeout(args.timeout)
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        tasks = [client(http, url, [songs[(c + r) % len(songs)] for r in range(args.requests)],
                        results) for c in range(args.clients)]
        if args.kill:
            tasks.append(killer(service_pid, args.kill, args.kill_after, log))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return results, wall, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4, help="per client, one after another")
    parser.add_argument("--seconds", type=float, default=20., help="length of each song")
    parser.add_argument("--kill", choices=DEPLOYMENTS[1:], help="replica to SIGKILL mid-run")
    parser.add_argument("--kill-after", type=float, default=20.)
    parser.add_argument("--timeout", type=float, default=1800.)
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args()
    songs = [encode_stem(song(args.seconds, seed=i), 44100, "mp3", 192) for i in range(8)]
    folder = Path(tempfile.mkdtemp(prefix="load_"))
    config = write_config(folder / "serve_config.yaml", port=args.port, host="127.0.0.1",
                          args={"model_repo": str(standin_repo()),
                                "result_cache_mb": 0})  # every request runs the model
    spill_before = spill_files()
    url, process = start_service(args, config)
    try:
        results, wall, log = asyncio.run(_measured(url, process.pid, args, songs))
    finally:
        stop_service(process)
    failed = [r for r in results if r[0] != 200]
    latencies = [r[1] for r in results if r[0] == 200]
    lines = [f"- {args.clients} clients x {args.requests} requests, {args.seconds:.0f} s songs "
             f"(music-like test signal, MP3 in and out), stand-in model (htdemucs geometry), "
             f"shipped serve_config.yaml",
             f"- **failed requests: {len(failed)} of {len(results)}**"
             + (f" (first: {failed[0]})" if failed else ""),
             f"- wall {wall:.1f} s; latency p50 {percentile(latencies, .5):.1f} s, p95 "
             f"{percentile(latencies, .95):.1f} s, max {max(latencies, default=0):.1f} s",
             *log, *args.memory_lines,
             f"- spill files in {SPILL_ROOT}: {spill_before} before, {spill_files()} after"]
    for line in lines:
        print(line)
    title = f"Load: {args.clients} x {args.requests} requests" + (
        f", {args.kill} replica killed" if args.kill else "")
    append_results(title, lines)


async def _measured(url: str, service_pid: int, args, songs) -> tuple:
    before = {name: rss_mb(pid) for name, pid in replica_pids(service_pid).items()}
    store_before = object_store(url)
    results, wall, log = await load(url, service_pid, args, songs)
    store_after = await store_settles(url, store_before)
    after = {name: rss_mb(pid) for name, pid in replica_pids(service_pid).items()}
    args.memory_lines = [
        "- replica RSS MB (before -> after): " + ", ".join(
            f"{name} {before.get(name, float('nan')):.0f} -> {after.get(name, float('nan')):.0f}"
            for name in DEPLOYMENTS),
        f"- object store before: {describe_store(store_before)}; after: {store_after}"]
    return results, wall, log


if __name__ == "__main__":
    main()
