"""Job flood: as many `POST /jobs` as a client can send, against a real `serve run` on
127.0.0.1 with the shipped limits. Reports how many were accepted (202), refused (429, 507)
and lost (accepted, never done), and every replica's and the job store's RSS before and at its
peak, so that memory is seen bounded by the configured limits, not by the flood.

    python -m benchmarks.job_flood --jobs 300 --threads 8 --seconds 60
    python -m benchmarks.job_flood --jobs 300 --kill-store-after 20   # SIGKILL the JobStore too
"""
import argparse
import os
import signal
import tempfile
import threading
import time
import typing as tp
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.common import append_results, song
from benchmarks.throughput import start_service, stop_service
from serve_graph.engine import make_random_repo
from serve_graph.engine.output import encode_stem
from serve_graph.launch import write_config
from serve_graph.procs import actor_pids, memory_mb, replica_pids

WATCHED = ("Ingress", "Decode", "Separate", "Encode", "JobStore", "ProxyActor")
ACTORS = ("JobStore", "ProxyActor")  # Ray actors that are not Serve replicas


class PeakRSS:
    """Samples the RSS of the service's replicas, its JobStore and Serve's HTTP proxy every
    `every` s."""

    def __init__(self, service_pid: int, every: float = 0.5):
        self.service_pid, self.every = service_pid, every
        self.before = self.sample()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> tp.Dict[str, float]:
        pids = dict(replica_pids(self.service_pid))
        pids.update({actor: pid for actor in ACTORS
                     for pid in actor_pids(self.service_pid, actor)})
        return {name: memory_mb(pid).get("VmRSS", 0.) for name, pid in pids.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for name, mb in self.sample().items():
                self.peak[name] = max(self.peak.get(name, 0.), mb)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def post(url: str, data: bytes, key: str) -> tp.Tuple[int, tp.Optional[dict]]:
    try:
        answer = requests.post(url + "/jobs", files={"audio_file": ("song.wav", data)},
                               headers={"Authorization": f"Bearer {key}"}, timeout=300)
    except requests.RequestException as exc:
        return 0, {"error": repr(exc)}
    return answer.status_code, answer.json()


def outcome(url: str, job: dict, key: str, deadline: float) -> str:
    """The job's final status once it has one; "lost" when it never does or is not found."""
    while time.monotonic() < deadline:
        try:
            view = requests.get(url + job["status_url"], timeout=30,
                                headers={"Authorization": f"Bearer {key}"})
        except requests.RequestException:
            time.sleep(1)
            continue
        if view.status_code == 404:
            return "lost"
        if view.status_code == 200 and view.json()["status"] in ("done", "failed", "cancelled"):
            return view.json()["status"]
        time.sleep(1)
    return "lost"


def kill_store_after(service_pid: int, seconds: float, log: tp.List[str]) -> None:
    time.sleep(seconds)
    for pid in actor_pids(service_pid, "JobStore"):
        os.kill(pid, signal.SIGKILL)
        log.append(f"- SIGKILL of the JobStore (pid {pid}) {seconds:.0f} s into the flood")


def flood(url: str, service_pid: int, args, data: bytes, keys: tp.List[str]) -> tp.List[str]:
    memory = PeakRSS(service_pid)
    log: tp.List[str] = []
    if args.kill_store_after:
        threading.Thread(target=kill_store_after, daemon=True,
                         args=(service_pid, args.kill_store_after, log)).start()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        posted = list(pool.map(lambda i: (keys[i % len(keys)], *post(url, data, keys[i % len(keys)])),
                               range(args.jobs)))
    posting = time.perf_counter() - start
    accepted = [(key, job) for key, code, job in posted if code == 202]
    deadline = time.monotonic() + args.timeout
    with ThreadPoolExecutor(args.threads) as pool:
        ends = Counter(pool.map(lambda kj: outcome(url, kj[1], kj[0], deadline), accepted))
    wall = time.perf_counter() - start
    memory.stop()
    codes = Counter(code for _, code, _ in posted)
    reasons = Counter(body.get("error") for _, code, body in posted if code in (429, 507))
    return [*log,
            f"- posted {args.jobs} jobs ({len(data) / 2**20:.1f} MB WAV, {args.seconds:.0f} s "
            f"each, {args.threads} threads, {len(keys)} API keys) in {posting:.1f} s: answers "
            + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items())),
            f"- **accepted {len(accepted)}, refused {codes[429]} with 429 and {codes[507]} "
            f"with 507 ({dict(reasons)}), lost {ends['lost']}**; of the accepted: "
            + ", ".join(f"{status} {n}" for status, n in sorted(ends.items())),
            f"- all accepted jobs ended {wall:.0f} s after the first post",
            "- RSS MB (before the flood -> peak during it): " + ", ".join(
                f"{name} {_mb(memory.before.get(name))} -> {_mb(memory.peak.get(name))}"
                for name in WATCHED)]


def _mb(value: tp.Optional[float]) -> str:
    return "not yet started" if not value else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60., help="length of each song (WAV)")
    parser.add_argument("--keys", type=int, default=30, help="API keys the jobs come from")
    parser.add_argument("--kill-store-after", type=float, default=0.)
    parser.add_argument("--timeout", type=float, default=3600.)
    parser.add_argument("--port", type=int, default=8768)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="job_flood_"))
    keys = [f"flood-key-{i}" for i in range(args.keys)]
    (folder / "keys").write_text("\n".join(keys) + "\n")
    repo = folder / "models"
    make_random_repo(repo, "htdemucs", size="tiny")
    config = write_config(folder / "serve_config.yaml", port=args.port, host="127.0.0.1",
                          args={"model_repo": str(repo), "api_keys_file": str(folder / "keys"),
                                "job_storage": str(folder / "job_storage"),
                                "result_cache_mb": 0})  # every job runs the model
    data = encode_stem(song(args.seconds), 44100, "wav")
    url, process = start_service(args, config)
    try:
        lines = flood(url, process.pid, args, data, keys)
    finally:
        stop_service(process)
    lines.insert(0, "- tiny model, shipped serve_config.yaml and its job limits (max_jobs 100, "
                    "max_jobs_per_client 10, max_job_storage_mb 10240, jobs_per_replica 2, "
                    "max_upload_memory_mb 1024), job storage a local folder; MP3 stems")
    title = f"Job flood: {args.jobs} jobs" + (", JobStore killed" if args.kill_store_after
                                               else "")
    append_results(title, lines)


if __name__ == "__main__":
    main()
