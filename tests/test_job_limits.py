"""Jobs within bounds, over real HTTP: caps on jobs in all and per client (429 with Retry-After),
on the bytes the job storage holds (507) and on the uploads a replica takes in at once (429,
for /separate too); queued jobs taken fairly across clients; uploads and ZIPs on the job
storage, not in memory; and every accepted job found again after the whole service restarts
on the same storage."""
import io
import threading
import time
import zipfile

import pytest
import requests

from audio_files import encode, tone
from serve_graph.job_runner import WATCH_S
from serve_graph.jobs import ORPHAN_AFTER_S
from serve_process import tiny_service

pytestmark = pytest.mark.serve
KEYS = ("key-one", "key-two")


def settings(folder) -> dict:
    return {"max_windows": 100_000, "api_keys_file": str(folder / "keys"),
            "job_storage": str(folder / "job_storage"), "max_jobs": 3,
            "max_jobs_per_client": 2, "jobs_per_replica": 1, "max_job_storage_mb": 12,
            "max_upload_memory_mb": 0.2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job_limits")
    (folder / "keys").write_text("\n".join(KEYS) + "\n")
    return folder


@pytest.fixture(scope="module")
def service(folder, tiny_repo):
    server = tiny_service(folder, tiny_repo, settings(folder))
    yield server
    server.kill()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def post(url: str, route: str, song: bytes, key: str, **fields) -> requests.Response:
    return requests.post(url + route, files={"audio_file": ("song.mp3", song)},
                         data={k: str(v) for k, v in fields.items()}, headers=auth(key),
                         timeout=120)


def status(url: str, job: dict, key: str) -> dict:
    return requests.get(url + job["status_url"], headers=auth(key), timeout=10).json()


def test_jobs_are_capped_in_all_and_per_client_and_taken_fairly(service):
    """One job runs at a time (`jobs_per_replica: 1`): key one's second job waits while key
    two's, queued after it, runs first, since key one already has one running."""
    song = encode(tone(8.0, 44100, 2, seed=1), 44100, "mp3")
    first, second = (post(service.url, "/jobs", song, KEYS[0], shifts=2) for _ in range(2))
    assert first.status_code == second.status_code == 202, second.text
    over = post(service.url, "/jobs", song, KEYS[0])
    assert over.status_code == 429 and over.json()["error"] == "too_many_jobs"
    assert "max_jobs_per_client" in over.json()["detail"] and int(over.headers["retry-after"]) > 0
    other = post(service.url, "/jobs", song, KEYS[1], shifts=2)
    assert other.status_code == 202, other.text
    full = post(service.url, "/jobs", song, KEYS[1])
    assert full.status_code == 429 and "(max_jobs)" in full.json()["detail"]
    assert int(full.headers["retry-after"]) > 0

    jobs = [(first.json(), KEYS[0]), (second.json(), KEYS[0]), (other.json(), KEYS[1])]
    started: list = []
    deadline = time.monotonic() + 240
    while len(started) < 3 and time.monotonic() < deadline:
        for job, key in jobs:
            if job["id"] not in started and status(service.url, job, key)["status"] != "queued":
                started.append(job["id"])
        time.sleep(0.1)
    assert started == [first.json()["id"], other.json()["id"], second.json()["id"]]
    for job, key in jobs:
        done = wait_for_key(service.url, job, key)
        assert done["status"] == "done", done


def wait_for_key(url: str, job: dict, key: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = status(url, job, key)
        if view["status"] in ("done", "failed", "cancelled"):
            return view
        time.sleep(0.3)
    raise AssertionError(f"job {job['id']} did not end in {timeout} s")


def test_uploads_and_results_live_on_the_job_storage(service, folder):
    song = encode(tone(3.0, 44100, 2, seed=2), 44100, "mp3")
    job = post(service.url, "/jobs", song, KEYS[0], format="wav").json()
    done = wait_for_key(service.url, job, KEYS[0])
    storage = folder / "job_storage"
    results = [path for path in (storage / "results").iterdir() if path.name.startswith(job["id"])]
    result = requests.get(service.url + done["result_url"], headers=auth(KEYS[0]), timeout=60)
    assert len(results) == 1 and results[0].read_bytes() == result.content
    assert int(result.headers["content-length"]) == len(result.content)
    assert zipfile.ZipFile(io.BytesIO(result.content)).namelist()[0].endswith(".wav")
    assert (storage / "records" / job["id"]).exists()
    assert not (storage / "uploads" / job["id"]).exists()  # gone once the job ended


def test_a_full_job_storage_answers_507(service):
    big = encode(tone(75.0, 44100, 2, seed=4), 44100, "wav16")  # 13.2 MB > 12 MB
    refused = post(service.url, "/jobs", big, KEYS[1])
    assert refused.status_code == 507 and refused.json()["error"] == "storage_full", refused.text
    assert "max_job_storage_mb" in refused.json()["detail"] and refused.headers["retry-after"]


def test_uploads_in_flight_are_capped_for_separate_too(service):
    """With one upload being separated, a second over `max_upload_memory_mb` waits outside:
    429 before its body is read."""
    long_song = encode(tone(20.0, 44100, 2, seed=5), 44100, "mp3")
    answers = []
    busy = threading.Thread(target=lambda: answers.append(
        post(service.url, "/separate", long_song, KEYS[0], shifts=4)))
    busy.start()
    time.sleep(1.5)
    refused = post(service.url, "/separate", long_song, KEYS[1])
    busy.join(240)
    assert refused.status_code == 429 and refused.json()["error"] == "too_many_uploads"
    assert "max_upload_memory_mb" in refused.json()["detail"] and refused.headers["retry-after"]
    assert answers and answers[0].status_code == 200
    again = post(service.url, "/separate", long_song, KEYS[1])  # the budget was given back
    assert again.status_code == 200, again.text


def test_every_accepted_job_is_found_again_after_a_restart(service, folder, tiny_repo):
    """The service stopped with a finished, a running and a queued job on its storage. A new
    service on the same storage whose model is not up (its Separate replica cannot be placed)
    answers the first from its stored ZIP and keeps the others queued, not failed; one whose
    model is up runs them."""
    song = encode(tone(10.0, 44100, 2, seed=6), 44100, "mp3")
    finished = post(service.url, "/jobs", song, KEYS[1]).json()
    wait_for_key(service.url, finished, KEYS[1])
    before = requests.get(service.url + finished["result_url"], headers=auth(KEYS[1]),
                          timeout=60).content
    running, queued = (post(service.url, "/jobs", song, KEYS[0], shifts=3).json()
                       for _ in range(2))
    deadline = time.monotonic() + 60
    while status(service.url, running, KEYS[0])["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    service.kill()  # as a crash would: every record is written through, none waits for a stop

    no_model = tiny_service(folder, tiny_repo, settings(folder), ready_path="/healthz",
                            deployments={"Separate": {"ray_actor_options": {"num_cpus": 64}}})
    try:
        after = requests.get(no_model.url + finished["result_url"], headers=auth(KEYS[1]),
                             timeout=60)
        assert after.status_code == 200 and after.content == before
        deadline = time.monotonic() + ORPHAN_AFTER_S + 3 * WATCH_S
        while status(no_model.url, running, KEYS[0])["status"] == "running":  # its owner gone
            assert time.monotonic() < deadline, "the orphaned job was not queued again"
            time.sleep(0.2)
        time.sleep(2 * WATCH_S)  # and no replica without the model claims it meanwhile
        assert requests.get(no_model.url + "/readyz", timeout=30).status_code == 503
        for job in (running, queued):
            assert status(no_model.url, job, KEYS[0])["status"] == "queued"
    finally:
        no_model.kill()

    restarted = tiny_service(folder, tiny_repo, settings(folder))
    try:
        for job in (running, queued):
            done = wait_for_key(restarted.url, job, KEYS[0])
            assert done["status"] == "done", done["error"]
            zipped = requests.get(restarted.url + done["result_url"], headers=auth(KEYS[0]),
                                  timeout=60)
            assert len(zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()) == 4
    finally:
        restarted.kill()
