"""A request interrupted costs time, not the service. A client that leaves takes its work with
it: its queued windows and its encoding are cancelled, and the next request answers as fast as
on an idle service (+2 s at most). A replica killed mid-request (SIGKILL) costs time, not the
request: the client still gets its ZIP, and later requests are served. Real `serve run`, real
processes; one service for both (the cancel test first, on an untouched service)."""
import io
import os
import signal
import threading
import time
import zipfile

import pytest
import requests

from audio_files import encode, tone
from serve_graph.procs import replica_pids
from serve_process import ServeProcess, tiny_service

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    server = tiny_service(tmp_path_factory.mktemp("faults"), tiny_repo, {"max_windows": 100_000})
    yield server
    server.kill()


def replica_pid(server: ServeProcess, deployment: str) -> int:
    """The PID of the (one) replica of `deployment` among the service's processes."""
    return replica_pids(server.pid)[deployment]


def windows_run(url: str) -> int:
    return requests.get(url + "/stats", timeout=30).json()["windows"]


def post(url, data, timeout, **fields) -> float:
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("s.mp3", data)},
                             data=fields, timeout=timeout)
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


def test_disconnected_request_is_cancelled(service):
    url = service.url
    short = encode(tone(2.0, 44100, 2, seed=1), 44100, "mp3")
    big = encode(tone(20.0, 44100, 2, seed=2), 44100, "mp3")
    post(url, short, 60)
    idle = min(post(url, short, 60) for _ in range(3))
    start = windows_run(url)
    with pytest.raises(requests.exceptions.ReadTimeout):  # ~800 windows: the client leaves
        post(url, big, 8, shifts=20, overlap=0.5)
    left = windows_run(url)
    print(f"idle {idle:.2f} s; {left - start} windows ran before the client left")
    assert left - start > 10  # the big request was being separated
    assert post(url, short, 120) <= idle + 2
    before = windows_run(url)
    time.sleep(3)
    assert windows_run(url) - before <= 1  # nothing of the big request runs any more


@pytest.mark.parametrize("deployment", ["Separate", "Encode", "Decode"])
def test_killed_replica_does_not_fail_the_request(service, deployment):
    song = encode(tone(10.0, 44100, 2, seed=4), 44100, "mp3")  # 80 windows: killed at 20
    answer = {}

    def post():
        answer["response"] = requests.post(
            service.url + "/separate", files={"audio_file": ("s.mp3", song)},
            data={"shifts": 4, "overlap": 0.5}, timeout=300)

    victim = replica_pid(service, deployment)
    start = windows_run(service.url)
    client = threading.Thread(target=post)
    client.start()
    deadline = time.monotonic() + 60
    while windows_run(service.url) - start < 20:  # the song is being separated
        assert time.monotonic() < deadline and client.is_alive()
        time.sleep(0.1)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    client.join(300)
    response = answer["response"]
    assert response.status_code == 200, response.text
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert names == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3"]
    print(f"{deployment} killed: the request finished {time.monotonic() - killed_at:.1f} s later")
    assert replica_pid(service, deployment) != victim  # Serve started a new one
    again = requests.post(service.url + "/separate", files={"audio_file": ("s.mp3", song)},
                          timeout=120)
    assert again.status_code == 200
