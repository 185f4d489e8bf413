"""A client that leaves takes its work with it: its queued windows and its encoding are cancelled,
and the next request answers as fast as on an idle service (+2 s at most). Real `serve run`."""
import time

import pytest
import requests

from audio_files import encode, tone
from serve_process import tiny_service

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    server = tiny_service(tmp_path_factory.mktemp("cancel"), tiny_repo, {"max_windows": 100_000})
    yield server.url
    server.kill()


def post(url, data, timeout, **fields) -> float:
    start = time.perf_counter()
    response = requests.post(url + "/separate", files={"audio_file": ("s.mp3", data)},
                             data=fields, timeout=timeout)
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


def windows_run(url) -> int:
    return requests.get(url + "/stats", timeout=30).json()["windows"]


def test_disconnected_request_is_cancelled(service):
    short = encode(tone(2.0, 44100, 2, seed=1), 44100, "mp3")
    big = encode(tone(20.0, 44100, 2, seed=2), 44100, "mp3")
    post(service, short, 60)
    idle = min(post(service, short, 60) for _ in range(3))
    start = windows_run(service)
    with pytest.raises(requests.exceptions.ReadTimeout):  # ~800 windows: the client leaves
        post(service, big, 8, shifts=20, overlap=0.5)
    left = windows_run(service)
    print(f"idle {idle:.2f} s; {left - start} windows ran before the client left")
    assert left - start > 10  # the big request was being separated
    assert post(service, short, 120) <= idle + 2
    before = windows_run(service)
    time.sleep(3)
    assert windows_run(service) - before <= 1  # nothing of the big request runs any more
