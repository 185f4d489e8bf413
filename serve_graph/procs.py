"""Processes by PID, from /proc (Linux): who started whom, and stopping a process tree.

Ray's worker processes start their own sessions, so a process group does not hold them all;
the tree of parent links does, while its root runs. `stop_tree` snapshots that tree, asks the
root to stop, and kills by PID whatever of the snapshot outlives it.
"""
import os
import signal
import subprocess
import time
import typing as tp
from pathlib import Path


def cmdline(pid: int) -> tp.List[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _stat(pid: int) -> tp.List[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def parent(pid: int) -> int:
    stat = _stat(pid)
    return int(stat[1]) if stat else 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used so far, all its threads; 0 when gone."""
    stat = _stat(pid)
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK") if stat else 0.


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    stat = _stat(pid)
    return bool(stat) and stat[0] != "Z"


def age(pid: int) -> float:
    """Seconds since process `pid` started (its start time in `/proc/<pid>/stat`, in clock
    ticks since boot, against `/proc/uptime`); 0 when unknown."""
    stat = _stat(pid)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK"), 0.)
    except (OSError, IndexError, ValueError):
        return 0.


def descendants(pid: int) -> tp.List[int]:
    """Every process below `pid` in the parent tree, now."""
    children: tp.Dict[int, tp.List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            children.setdefault(parent(int(entry)), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def memory_mb(pid: int) -> tp.Dict[str, float]:
    """The memory lines of `/proc/<pid>/status` in MB (`VmRSS`, `VmHWM`, `RssAnon`...);
    empty once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {name: int(value.split()[0]) / 1024 for name, _, value in
            (line.partition(":") for line in lines) if value.strip().endswith("kB")}


def replica_pids(service_pid: int, app: str = "separation") -> tp.Dict[str, int]:
    """`{deployment: pid}` of the Serve replicas of `app` below `service_pid` (a `serve run`),
    told by their process titles (`ray::ServeReplica:<app>:<deployment>`); one per
    deployment (the last found when there are several)."""
    marker = f"ServeReplica:{app}:"
    found = {}
    for pid in descendants(service_pid):
        for part in cmdline(pid):
            if marker in part:
                found[part.split(marker, 1)[1].split(".")[0].split()[0]] = pid
                break
    return found


def actor_pids(service_pid: int, actor: str) -> tp.List[int]:
    """The processes below `service_pid` whose title names Ray actor class `actor`
    (`ray::JobStore...`)."""
    return [pid for pid in descendants(service_pid)
            if any(part.startswith(f"ray::{actor}") for part in cmdline(pid))]


def wait_gone(pids: tp.Iterable[int], timeout: float) -> tp.List[int]:
    """Wait until none of `pids` runs, at most `timeout` s; returns those still running."""
    deadline = time.monotonic() + timeout
    left = [pid for pid in pids if alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [pid for pid in left if alive(pid)]
    return left


def kill_all(pids: tp.Iterable[int]) -> None:
    """SIGKILL each of `pids`, by PID; one already gone is skipped."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_tree(process: subprocess.Popen, sig: int = signal.SIGINT, grace: float = 60.,
              linger: float = 10.) -> tp.Optional[int]:
    """Send `sig` to `process`, wait `grace` s for it to exit, then `linger` s for the processes
    it had started; SIGKILL by PID whatever is left. Returns the process' exit code."""
    tree = descendants(process.pid)
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    kill_all(wait_gone(tree, linger))
    return process.returncode
