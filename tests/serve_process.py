"""Start the real service as a process (`serve run <config>`) and wait for it; stop it again.
Run a Python script that starts a Ray of its own, in a process of its own (`run_python`)."""
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import requests
from serve_graph.launch import deploy_failure, free_port, launch
from serve_graph.procs import descendants, kill_all, stop_tree, wait_gone

ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    """`serve run <config>` until `stop()` or `kill()`; ready once `GET <ready_path>` answers
    200: `/readyz` (every model loaded and every deployment up) unless the test is about a
    service that is not ready (`/`: the Ingress answers). `GET /` alone is not enough: the
    Ingress may answer before the Separate replicas have loaded their model."""

    def __init__(self, config: Path, port: int, env: dict, log: Path, timeout: float = 240,
                 start: tp.Callable[..., subprocess.Popen] = launch,
                 ready_path: str = "/readyz"):
        """`start(config, env, **popen)` starts the process (default: `launch`)."""
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = log.open("w")
        self._proc = start(config, env, stdout=self._log, stderr=subprocess.STDOUT)
        cmd = f"{start.__name__}({config})"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if deploy_failure(log):  # (the launcher may have exited after saying so)
                self.stop()  # and the log has the whole of Serve's message
                raise RuntimeError(f"{cmd}: the application failed to deploy: "
                                   f"{deploy_failure(log)}")
            if self._proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited: {log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + ready_path, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{cmd} did not answer in {timeout} s: {log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGINT) -> tp.Optional[int]:
        """Stop `serve run` and, by PID, every process it started; returns its exit code."""
        code = stop_tree(self._proc, sig)
        self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL `serve run` and every process it started, at once, by PID: a fixture's
        teardown, where the graceful stop (Serve removes the replicas deployment by deployment,
        ~8 s here) tests nothing; the tests of stopping use `stop`."""
        tree = descendants(self._proc.pid)
        stop_tree(self._proc, signal.SIGKILL, linger=0.)  # the rest by PID, without waiting
        left = wait_gone(tree, 10.)
        self._log.close()
        assert not left, f"still running after SIGKILL: {left}"

    @property
    def pid(self) -> int:
        return self._proc.pid


# The result cache off: the tests send the same song again and again, and what they test (faults,
# batching, limits, cancellation) needs the model to run each time. Tests of the cache turn it on.
UNCACHED = {"result_cache_mb": 0}


def tiny_service(folder: Path, tiny_repo: Path, args: tp.Optional[dict] = None,
                 deployments: tp.Optional[dict] = None, ready_path: str = "/readyz"
                 ) -> ServeProcess:
    """The shipped serve_config.yaml with the tiny model, `args` (over `UNCACHED`) and
    `deployments` overridden, on a free port of 127.0.0.1, started once `ready_path` answers
    (`ServeProcess`); logs to `folder/serve.log`."""
    from serve_graph.launch import write_config
    port = free_port()
    config = write_config(folder / "serve_config.yaml", port=port, host="127.0.0.1",
                          args={**UNCACHED, **(args or {})}, deployments=deployments or {})
    return ServeProcess(config, port, {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo)},
                        folder / "serve.log", ready_path=ready_path)


def listening_addresses(pids: tp.Iterable[int]) -> tp.List[tp.Tuple[int, str, int]]:
    """`(pid, address, port)` of every TCP socket listening in `pids` (from /proc/net/tcp{,6}
    and the processes' open file descriptors)."""
    import ipaddress
    import os
    listening = {}  # socket inode: (address, port)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            ordered = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(ordered)
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
            listening[fields[9]] = (str(ip), int(port, 16))
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # gone, or not ours to read
        for link in links:
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in listening:
                found.append((pid, *listening[inode]))
    return found


def run_python(script: str, *args: str, timeout: float = 120) -> tp.Tuple[str, str]:
    """`python -c script args` in a session of its own, from the repository root: its stdout
    and stderr once it exited 0. Past `timeout` it is SIGKILLed with everything it started (its
    Ray), by PID, and the test fails."""
    process = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        started = descendants(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        kill_all(started)
        out, err = process.communicate()
        raise AssertionError(f"the script did not end in {timeout} s: {err[-3000:]}") from None
    assert process.returncode == 0, err[-3000:]
    return out, err
