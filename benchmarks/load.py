"""Load: many clients at once against a real `serve run` on 127.0.0.1, optionally killing a
replica (SIGKILL) in the middle. Reports failed requests (the goal: none), p50/p95 latency,
each replica's RSS before and after, and whether the spill files and the object store are back
to their baseline afterwards.

    python -m benchmarks.load --clients 50 --requests 4 --seconds 20
    python -m benchmarks.load --clients 50 --requests 4 --seconds 20 --kill Separate --kill-after 20
    python -m benchmarks.load --clients 20 --requests 4 --seconds 20 --abandon 0.5

`--abandon P`: each request is, with probability P (seeded), dropped by its client at a random
moment of its run (the connection closed, as a browser tab closed or a client's timeout). The
goal: none of the others fails, the service stops the model work of the dropped ones (reported:
windows run for them of those they would have needed), and everything is released afterwards.
"""
import argparse
import asyncio
import glob
import os
import random
import signal
import tempfile
import time
import typing as tp
from pathlib import Path

import httpx
import requests

from benchmarks.common import append_results, full_size_repo, song
from benchmarks.overhead import standin_repo
from benchmarks.throughput import percentile, start_service, stop_service
from serve_graph.engine.output import SPILL_ROOT, encode_stem
from serve_graph.launch import write_config
from serve_graph.procs import cpu_seconds, descendants, memory_mb, replica_pids

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
                 results: tp.List[tp.Tuple[int, float, str]],
                 drop_after: tp.Sequence[tp.Optional[float]]) -> None:
    """Each song in turn; the i-th request is dropped after `drop_after[i]` s (None: kept),
    recorded with status -1."""
    for data, drop in zip(songs, drop_after):
        start = time.perf_counter()
        try:
            response = await asyncio.wait_for(
                http.post(url + "/separate", files={"audio_file": ("s.mp3", data)}), drop)
            results.append((response.status_code, time.perf_counter() - start,
                            response.text[:200] if response.status_code != 200 else ""))
        except asyncio.TimeoutError:  # dropped by this client: its connection is closed
            results.append((-1, time.perf_counter() - start, ""))
        except httpx.HTTPError as exc:
            results.append((0, time.perf_counter() - start, repr(exc)))


def drop_plan(args, within_s: float) -> tp.List[tp.List[tp.Optional[float]]]:
    """Per client, per request: after how many seconds its client drops it (None: never),
    seeded, uniform in [0.5, `within_s`] s."""
    draw = random.Random(0)
    return [[draw.uniform(0.5, within_s) if draw.random() < args.abandon else None
             for _ in range(args.requests)] for _ in range(args.clients)]


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
        plan = drop_plan(args, args.drop_within or args.typical_s)
        tasks = [client(http, url, [songs[(c + r) % len(songs)] for r in range(args.requests)],
                        results, plan[c]) for c in range(args.clients)]
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
    parser.add_argument("--abandon", type=float, default=0.,
                        help="share of requests whose client drops them midway (seeded)")
    parser.add_argument("--drop-within", type=float,
                        help="seconds within which a request is dropped (default: a first "
                             "estimate of its latency under the load)")
    parser.add_argument("--model", choices=("standin", "full"), default="standin",
                        help="the stand-in (htdemucs' geometry, a forward that costs nothing) "
                             "or the full-size architecture with random weights")
    args = parser.parse_args()
    songs = [encode_stem(song(args.seconds, seed=i), 44100, "mp3", 192) for i in range(8)]
    folder = Path(tempfile.mkdtemp(prefix="load_"))
    config = write_config(folder / "serve_config.yaml", port=args.port, host="127.0.0.1",
                          args={"model_repo": str(full_size_repo() if args.model == "full"
                                                  else standin_repo()),
                                "result_cache_mb": 0})  # every request runs the model
    spill_before = spill_files()
    url, process = start_service(args, config)
    try:
        results, wall, log = asyncio.run(_measured(url, process.pid, args, songs))
    finally:
        stop_service(process)
    failed = [r for r in results if r[0] not in (200, -1)]
    latencies = [r[1] for r in results if r[0] == 200]
    dropped = sum(r[0] == -1 for r in results)
    lines = [f"- {args.clients} clients x {args.requests} requests, {args.seconds:.0f} s songs "
             f"(music-like test signal, MP3 in and out), "
             + ("full-size htdemucs, random weights" if args.model == "full"
                else "stand-in model (htdemucs geometry)") + ", shipped serve_config.yaml",
             f"- **failed requests: {len(failed)} of {len(results) - dropped}**"
             + (f" (first: {failed[0]})" if failed else "")
             + (f"; {dropped} dropped by their clients midway" if args.abandon else ""),
             f"- wall {wall:.1f} s; " + (
                 f"latency p50 {percentile(latencies, .5):.1f} s, p95 "
                 f"{percentile(latencies, .95):.1f} s, max {max(latencies):.1f} s"
                 if latencies else "no request was answered"),
             *log, *args.memory_lines,
             f"- spill files in {SPILL_ROOT}: {spill_before} before, {spill_files()} after"]
    for line in lines:
        print(line)
    title = f"Load: {args.clients} x {args.requests} requests" + (
        f", {args.kill} replica killed" if args.kill else "") + (
        f", {args.abandon:.0%} dropped by their clients" if args.abandon else "") + (
        ", full-size model" if args.model == "full" else "")
    append_results(title, lines)


async def _measured(url: str, service_pid: int, args, songs) -> tuple:
    song_cpu = replicas_cpu(service_pid)
    windows_per_song, args.typical_s = await _one_song(url, songs[0], args.clients)
    song_cpu = replicas_cpu(service_pid) - song_cpu
    before = {name: rss_mb(pid) for name, pid in replica_pids(service_pid).items()}
    store_before = object_store(url)
    windows_before = _windows_run(url)
    cpu_before = replicas_cpu(service_pid)
    results, wall, log = await load(url, service_pid, args, songs)
    cpu_at_end = replicas_cpu(service_pid)
    idle_after_s, cpu_after = await until_idle(service_pid)
    store_after = await store_settles(url, store_before)
    after = {name: rss_mb(pid) for name, pid in replica_pids(service_pid).items()}
    args.memory_lines = [
        "- replica RSS MB (before -> after): " + ", ".join(
            f"{name} {before.get(name, float('nan')):.0f} -> {after.get(name, float('nan')):.0f}"
            for name in DEPLOYMENTS),
        f"- object store before: {describe_store(store_before)}; after: {store_after}"]
    if args.abandon:
        args.memory_lines += [
            _dropped_work(results, _windows_run(url) - windows_before, windows_per_song),
            f"- CPU of the replicas: {cpu_at_end - cpu_before:.1f} CPU-s during the load, "
            f"of {len(results) * song_cpu:.0f} CPU-s its {len(results)} songs cost whole "
            f"(one alone before the load: {song_cpu:.2f} CPU-s); after the last client had "
            f"its answer or left: {cpu_after - cpu_at_end:.1f} CPU-s, idle "
            f"{idle_after_s:.0f} s later"]
    return results, wall, log


def replicas_cpu(service_pid: int) -> float:
    """CPU-seconds used so far by the replicas and the processes they started (decode
    helpers)."""
    pids = [pid for replica in replica_pids(service_pid).values()
            for pid in (replica, *descendants(replica))]
    return sum(cpu_seconds(pid) for pid in pids)


async def until_idle(service_pid: int, timeout: float = 300.) -> tp.Tuple[float, float]:
    """Seconds until the replicas use under 0.1 CPU-s a second (their own housekeeping), and
    their CPU-seconds then."""
    start = time.perf_counter()
    used = replicas_cpu(service_pid)
    while time.perf_counter() - start < timeout:
        await asyncio.sleep(1.)
        previous, used = used, replicas_cpu(service_pid)
        if used - previous < 0.1:
            break
    return time.perf_counter() - start, used


async def _one_song(url: str, data: bytes, clients: int) -> tp.Tuple[int, float]:
    """Windows the model runs for one song (a request alone, before the load), and a first
    estimate of one request's latency under the load: alone x clients."""
    before = _windows_run(url)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        response = await http.post(url + "/separate", files={"audio_file": ("s.mp3", data)})
    response.raise_for_status()
    return _windows_run(url) - before, (time.perf_counter() - start) * clients


def _windows_run(url: str) -> int:
    return requests.get(url + "/stats", timeout=60).json()["windows"]


def _dropped_work(results, windows_run: int, windows_per_song: int) -> str:
    """How much model work the dropped requests cost, of what they would have cost."""
    done = sum(r[0] == 200 for r in results)
    dropped = sum(r[0] == -1 for r in results)
    spent = windows_run - done * windows_per_song
    return (f"- model windows run: {windows_run} ({windows_per_song} a song); for the "
            f"{dropped} dropped requests: {spent} of the {dropped * windows_per_song} they "
            f"would have needed ({spent / max(dropped * windows_per_song, 1):.0%})")


if __name__ == "__main__":
    main()
