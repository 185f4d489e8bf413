"""The README's commands, run literally: the blocks marked `<!-- readme-test: NAME -->` are
executed line by line with bash in a folder holding a copy of serve_config.yaml and a song.mp3,
so the README cannot drift from the code. The service answers on the config's port, 8000."""
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import zipfile

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


def shell(line: str, cwd, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True,
                          timeout=300, **popen)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_readme_commands_work_as_written(tmp_path):
    blocks = readme_blocks()
    assert set(blocks) == {"try", "curl", "cli"}, blocks
    if not port_is_free(8000):
        pytest.fail("the README's service answers on port 8000, which is taken")
    shutil.copy(ROOT / "serve_config.yaml", tmp_path)
    (tmp_path / "song.mp3").write_bytes(encode(tone(4., 44100, 2), 44100, "mp3"))
    make_repo, start = blocks["try"]
    assert shell(make_repo, tmp_path).returncode == 0
    server = subprocess.Popen(["bash", "-c", start], cwd=tmp_path, start_new_session=True,
                              stdout=(tmp_path / "serve.log").open("w"),
                              stderr=subprocess.STDOUT)
    try:
        wait_ready(server, tmp_path)
        separate, health = blocks["curl"]
        done = shell(separate, tmp_path)
        assert done.returncode == 0, done.stderr
        names = zipfile.ZipFile(io.BytesIO((tmp_path / "stems.zip").read_bytes())).namelist()
        assert names == ["vocals.mp3", "no_vocals.mp3"]
        answer = json.loads(shell(health, tmp_path).stdout)
        assert answer["status"] == "ok" and answer["models"]["htdemucs"]["state"] == "loaded"

        (tmp_path / "stems.zip").unlink()
        cli, = blocks["cli"]
        done = shell(cli, tmp_path)
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
