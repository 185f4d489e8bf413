"""The README's commands, run literally: the blocks marked `<!-- readme-test: NAME -->` are
executed line by line with bash in a folder holding a copy of serve_config.yaml and a song.mp3,
so the README cannot drift from the code. The service answers on the config's port, 8000.

They run as a newcomer's shell would after the README's set-up: another interpreter is the
first `python` on the PATH (a decoy that fails), and the README's `source .venv/bin/activate`,
done for the environment these tests run in, is what makes the project's interpreter answer."""
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from audio_files import encode, tone
from serve_graph.procs import descendants, stop_tree
from serve_process import ROOT
from test_startup import assert_all_gone

pytestmark = pytest.mark.serve
URL = "http://localhost:8000"


def readme_blocks() -> dict:
    """{name: [command lines]} of the marked bash blocks."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"<!-- readme-test: (\w+) -->\s*```bash\n(.*?)```", text, re.S)
    return {name: [line for line in body.splitlines() if line.strip()] for name, body in found}


DECOY_EXIT = 97


def decoy_path(folder: Path) -> str:
    """PATH with a `python` and `python3` first that are not the project's interpreter."""
    folder.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        decoy = folder / name
        decoy.write_text(f"#!/bin/sh\necho 'a decoy {name}, not the project one' >&2\n"
                         f"exit {DECOY_EXIT}\n")
        decoy.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def activation(setup_line: str) -> str:
    """The README's `source .venv/bin/activate`, for the environment these tests run in: its
    own activate script when it is a virtual environment, else its bin folder first on PATH."""
    assert setup_line == "bash setup.sh && source .venv/bin/activate", setup_line
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.exists():
        return f"source {shlex.quote(str(activate))}"
    return f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"'


class Shell:
    """bash in `cwd`, a decoy python first on the PATH, then each line after `prefix`."""

    def __init__(self, cwd: Path, prefix: str):
        self.cwd, self.prefix = cwd, prefix
        self.env = {**os.environ, "PATH": decoy_path(cwd / "decoy")}
        self.env.pop("VIRTUAL_ENV", None)

    def command(self, line: str) -> list:
        return ["bash", "-c", f"{self.prefix}\n{line}"]

    def run(self, line: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(line), cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=300)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_readme_commands_work_as_written(tmp_path):
    blocks = readme_blocks()
    assert set(blocks) == {"setup", "try", "curl", "cli"}, blocks
    if not port_is_free(8000):
        pytest.fail("the README's service answers on port 8000, which is taken")
    shutil.copy(ROOT / "serve_config.yaml", tmp_path)
    (tmp_path / "song.mp3").write_bytes(encode(tone(4., 44100, 2), 44100, "mp3"))
    setup, _serve = blocks["setup"]
    shell = Shell(tmp_path, activation(setup))
    assert Shell(tmp_path, "").run("python -V").returncode == DECOY_EXIT  # not activated
    make_repo, start = blocks["try"]
    made = shell.run(make_repo)
    assert made.returncode == 0, made.stderr
    server = subprocess.Popen(shell.command(start), cwd=tmp_path, env=shell.env,
                              start_new_session=True, stdout=(tmp_path / "serve.log").open("w"),
                              stderr=subprocess.STDOUT)
    try:
        wait_ready(server, tmp_path)
        separate, health = blocks["curl"]
        done = shell.run(separate)
        assert done.returncode == 0, done.stderr
        names = zipfile.ZipFile(io.BytesIO((tmp_path / "stems.zip").read_bytes())).namelist()
        assert names == ["vocals.mp3", "no_vocals.mp3"]
        answer = json.loads(shell.run(health).stdout)
        assert answer["status"] == "ok" and answer["models"]["htdemucs"]["state"] == "loaded"

        (tmp_path / "stems.zip").unlink()
        cli, = blocks["cli"]
        done = shell.run(cli)
        assert done.returncode == 0, done.stderr
        assert zipfile.ZipFile(tmp_path / "stems.zip").namelist() == names
    finally:
        started = descendants(server.pid)
        stop_tree(server, signal.SIGINT)  # Ctrl-C
    assert_all_gone(started)


def wait_ready(server: subprocess.Popen, folder, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError((folder / "serve.log").read_text()[-3000:])
        try:
            if requests.get(URL + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("the README's service did not become ready: " +
                       (folder / "serve.log").read_text()[-3000:])
