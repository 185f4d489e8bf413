"""What apps integrate with, over real HTTP against the real service: songs by URL from a real
server on 127.0.0.1 (allow-listed), refused when they point inside the network; job callbacks
to a real receiver, signed per API key and verified with the Standard Webhooks library,
retried with backoff, recorded in the job; and the result cache, hit in milliseconds without
the model, shared by the node's two Ingress replicas, never across keys, gone with its job's
DELETE and past its age."""
import base64
import hashlib
import hmac
import io
import time
import typing as tp
import zipfile
from pathlib import Path

import pytest
import requests
from standardwebhooks import Webhook

from audio_files import encode, tone
from bad_inputs import REDIRECTS_INSIDE
from serve_graph.jobs import key_id
from serve_process import tiny_service
from test_service import scrape, total
from web_servers import Receiver, song_server

pytestmark = pytest.mark.serve
KEYS = ("integration-key-one", "integration-key-two")
RETRY_S = 6.  # webhook_retry_s: attempts at 0, 1 and 3 s, then the next (7 s) is past it
URL_TIMEOUT_S = 3.
CACHE_TTL_S = 10.  # result_cache_ttl_s: each cache test here asks again within a few seconds
HEALTH_S = 1.  # the Ingress' health check period (Serve's default: 10 s), which sweeps the cache


@pytest.fixture(scope="module")
def songs():
    return {"song.mp3": encode(tone(3.0, 44100, 2, seed=11), 44100, "mp3"),
            "other.mp3": encode(tone(2.5, 44100, 2, seed=12), 44100, "mp3"),
            "cached.mp3": encode(tone(2.0, 44100, 2, seed=13), 44100, "mp3"),
            "big.mp3": b"\0" * (3 * 2**20), "text.mp3": b"not audio\n" * 100,
            "half.wav": encode(tone(3.0, 44100, 2, seed=14), 44100, "wav16")[:264_000]}


@pytest.fixture(scope="module")
def files(songs):
    server = song_server(songs, slow_s=URL_TIMEOUT_S + 2)
    yield server
    server.close()


@pytest.fixture(scope="module")
def receiver():
    hooks = Receiver(failures={"/flaky": 2, "/down": 10 ** 6})
    yield hooks
    hooks.close()


class Served(tp.NamedTuple):
    url: str
    cache: Path  # its result_cache_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_repo):
    folder = tmp_path_factory.mktemp("integrations")
    (folder / "keys").write_text("\n".join(KEYS) + "\n")
    server = tiny_service(folder, tiny_repo, {
        "max_upload_mb": 2, "api_keys_file": str(folder / "keys"),
        "url_allow_networks": ["127.0.0.1/32"], "url_timeout_s": URL_TIMEOUT_S,
        "webhook_retry_s": RETRY_S, "webhook_timeout_s": 2., "result_cache_mb": 64,
        "result_cache_ttl_s": CACHE_TTL_S, "result_cache_dir": str(folder / "cache")},
        # the cache is the node's, not theirs
        deployments={"Ingress": {"num_replicas": 2, "health_check_period_s": HEALTH_S}})
    yield Served(server.url, folder / "cache")
    server.kill()


@pytest.fixture(scope="module")
def service(served):
    return served.url


def auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def separate(url: str, key: str = KEYS[0], data: bytes = None, **fields) -> requests.Response:
    files = {"audio_file": ("upload name.mp3", data)} if data is not None else None
    return requests.post(url + "/separate", files=files, headers=auth(key), timeout=120,
                         data={name: str(value) for name, value in fields.items()})


def job(url: str, key: str = KEYS[0], **fields) -> dict:
    answer = requests.post(url + "/jobs", headers=auth(key), timeout=60,
                           data={name: str(value) for name, value in fields.items()})
    assert answer.status_code == 202, answer.text
    return answer.json()


def wait_for(url: str, job_id: str, done=lambda job: job["status"] in ("done", "failed"),
             key: str = KEYS[0], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/jobs/{job_id}", headers=auth(key), timeout=10).json()
        if done(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {status}")


def windows_run(url: str) -> int:
    return requests.get(url + "/stats", headers=auth(), timeout=30).json()["windows"]


def settled_windows(url: str, quiet_s: float = 1.5, timeout: float = 60) -> int:
    """The windows run once the count has held still for `quiet_s` (an earlier test's
    cancelled job may still have windows in flight at Separate)."""
    deadline = time.monotonic() + timeout
    count = windows_run(url)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = windows_run(url)
        if now == count:
            return count
        count = now
    raise AssertionError(f"the model kept running windows for {timeout} s")


def test_a_song_by_url_is_the_same_song_as_its_upload(service, files, songs):
    """The URL's bytes are the upload's: the upload that follows is answered from the cache
    (same key: the bytes and options, not the file name), under its own file name."""
    by_url = separate(service, audio_url=f"{files.url}/song.mp3", two_stems="vocals")
    assert by_url.status_code == 200, by_url.text
    assert by_url.headers["x-cache"] == "miss"
    assert 'filename="song_stems.zip"' in by_url.headers["content-disposition"]
    assert zipfile.ZipFile(io.BytesIO(by_url.content)).namelist() == ["vocals.mp3",
                                                                      "no_vocals.mp3"]
    uploaded = separate(service, data=songs["song.mp3"], two_stems="vocals")
    assert uploaded.headers["x-cache"] == "hit" and uploaded.content == by_url.content
    assert 'filename="upload name_stems.zip"' in uploaded.headers["content-disposition"]


@pytest.mark.parametrize("target", list(REDIRECTS_INSIDE.values()), ids=list(REDIRECTS_INSIDE))
def test_a_redirect_inside_the_network_is_refused(service, files, target):
    answer = separate(service, audio_url=f"{files.url}/redirect?to={target}")
    assert (answer.status_code, answer.json()["error"]) == (422, "url_refused"), answer.text


@pytest.mark.parametrize("path, status, error", [
    ("/missing.mp3", 422, "url_fetch_failed"),
    ("/slow/song.mp3", 422, "url_fetch_failed"),
    ("/big.mp3", 413, "upload_too_large"),
    ("/text.mp3", 415, "invalid_audio"),
])
def test_a_url_that_cannot_give_a_song_is_refused(service, files, path, status, error):
    started = time.monotonic()
    answer = separate(service, audio_url=files.url + path)
    assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
    assert time.monotonic() - started < URL_TIMEOUT_S + 10


def test_the_song_comes_as_a_file_or_a_url_not_both_nor_neither(service, files, songs):
    both = separate(service, data=songs["song.mp3"], audio_url=f"{files.url}/song.mp3")
    neither = separate(service, two_stems="vocals")
    for answer in (both, neither):
        assert answer.status_code == 422 and "audio_url" in answer.json()["detail"], answer.text


def documented_key_secret(api_key: str) -> str:
    """The README's recipe, written out here: whsec_ + base64(HMAC-SHA256(api_key, ...))."""
    digest = hmac.new(api_key.encode(), b"serve_graph webhook", hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode()


def test_a_job_calls_back_signed_with_its_keys_secret(service, files, receiver):
    created = job(service, audio_url=f"{files.url}/other.mp3", two_stems="drums",
                  callback_url=f"{receiver.url}/done")
    assert created["callback"] == {"url": f"{receiver.url}/done", "state": None,
                                   "attempts": []}
    (_, _, headers, body), = receiver.wait_for("/done", 1)
    payload = Webhook(documented_key_secret(KEYS[0])).verify(body, headers)
    assert payload["id"] == created["id"] and payload["status"] == "done"
    assert payload["result_url"] == f"/jobs/{created['id']}/result"
    with pytest.raises(Exception):  # another key's secret does not verify it
        Webhook(documented_key_secret(KEYS[1])).verify(body, headers)
    status = wait_for(service, created["id"], lambda job: job["callback"]["state"] != "pending")
    assert status["callback"]["state"] == "delivered"
    assert [attempt["status"] for attempt in status["callback"]["attempts"]] == [204]


def test_a_failing_receiver_is_retried_with_backoff_then_given_up(service, songs, receiver):
    created = [requests.post(service + "/jobs", headers=auth(), timeout=60,
                             files={"audio_file": ("a.mp3", songs["other.mp3"])},
                             data={"two_stems": "bass", "callback_url": receiver.url + path}
                             ).json() for path in ("/flaky", "/down")]
    flaky_calls = receiver.wait_for("/flaky", 3, timeout=120)
    gaps = [later[0] - earlier[0] for earlier, later in zip(flaky_calls, flaky_calls[1:])]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # backoff: 1 s, then 2 s
    assert len({call[2]["webhook-id"] for call in flaky_calls}) == 1  # one delivery's id
    flaky = wait_for(service, created[0]["id"],
                     lambda job: (job["callback"] or {}).get("state") == "delivered")
    assert [attempt["status"] for attempt in flaky["callback"]["attempts"]] == [500, 500, 204]
    down = wait_for(service, created[1]["id"],
                    lambda job: (job["callback"] or {}).get("state") == "failed",
                    timeout=RETRY_S + 60)
    attempts = down["callback"]["attempts"]
    assert len(attempts) == 3 and all(attempt["status"] == 500 for attempt in attempts)
    assert attempts[-1]["at"] - down["updated_at"] < RETRY_S  # given up within the time


def test_a_cancelled_job_calls_back(service, songs, receiver):
    answer = requests.post(service + "/jobs", headers=auth(), timeout=60,
                           files={"audio_file": ("a.mp3", songs["song.mp3"])},
                           data={"shifts": 5, "callback_url": f"{receiver.url}/cancelled"})
    assert answer.status_code == 202, answer.text
    requests.delete(f"{service}/jobs/{answer.json()['id']}", headers=auth(), timeout=30)
    (_, _, headers, body), = receiver.wait_for("/cancelled", 1)
    payload = Webhook(documented_key_secret(KEYS[0])).verify(body, headers)
    assert payload["status"] == "cancelled" and headers["webhook-id"].endswith("-cancelled")


def test_a_failed_job_calls_back_with_its_error(service, songs, receiver):
    """A WAV cut in half passes the check before the 202 and fails in its decoding."""
    answer = requests.post(service + "/jobs", headers=auth(), timeout=60,
                           files={"audio_file": ("bad.wav", songs["half.wav"])},
                           data={"callback_url": f"{receiver.url}/failed"})
    assert answer.status_code == 202, answer.text
    (_, _, headers, body), = receiver.wait_for("/failed", 1)
    payload = Webhook(documented_key_secret(KEYS[0])).verify(body, headers)
    assert payload["status"] == "failed" and payload["error"]["error"] == "invalid_audio"


@pytest.mark.parametrize("callback_url", [
    "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/hook", "http://[::1]/hook",
    "http://[::ffff:10.0.0.1]/hook", "ftp://example.com/hook", "file:///tmp/hook"])
def test_a_callback_inside_the_network_is_refused_before_the_job(service, songs, callback_url):
    answer = requests.post(service + "/jobs", headers=auth(), timeout=60,
                           files={"audio_file": ("a.mp3", songs["other.mp3"])},
                           data={"callback_url": callback_url})
    assert answer.status_code == 422 and answer.json()["error"] == "url_refused", answer.text


def test_the_cache_answers_in_milliseconds_without_the_model_and_never_across_keys(
        service, songs):
    data = songs["cached.mp3"]
    billed = ("ray_serve_graph_client_audio_seconds_total",
              {"client": key_id(KEYS[0]), "answer": "cached"})
    billed_before = total(scrape(service), billed[0], **billed[1])
    first = separate(service, data=data, format="wav")
    assert first.status_code == 200 and first.headers["x-cache"] == "miss", first.text
    before = settled_windows(service)
    for _ in range(4):  # whichever of the two Ingress replicas answers, it hits
        again = separate(service, data=data, format="wav")
        assert again.headers["x-cache"] == "hit" and again.content == first.content
    assert again.headers["x-audio-seconds"] == first.headers["x-audio-seconds"]
    deadline = time.monotonic() + 60  # a cached answer is counted for billing as one
    while total(scrape(service), billed[0], **billed[1]) - billed_before < \
            4 * float(first.headers["x-audio-seconds"]) - 1e-3:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert float(again.headers["server-timing"].split("dur=")[1]) < 1000  # ms
    assert windows_run(service) == before  # the model did not run
    other_options = separate(service, data=data, format="flac")
    assert other_options.headers["x-cache"] == "miss"
    other_key = separate(service, KEYS[1], data=data, format="wav")
    assert other_key.headers["x-cache"] == "miss" and windows_run(service) > before


def test_a_job_reuses_a_cached_result(service, songs):
    data = songs["cached.mp3"]
    separate(service, data=data, two_stems="other")
    answer = requests.post(service + "/jobs", headers=auth(), timeout=60,
                           files={"audio_file": ("c.mp3", data)}, data={"two_stems": "other"})
    done = wait_for(service, answer.json()["id"])
    result = requests.get(service + done["result_url"], headers=auth(), timeout=60)
    assert result.headers["x-cache"] == "hit" and result.status_code == 200


def test_a_cached_result_is_answered_and_kept_only_for_its_ttl(served, songs):
    """`result_cache_ttl_s` counts from the result's making, hits do not extend it: answered
    at half its age, its file is removed once past it by the Ingress' health checks, with no
    request coming, and the same request is separated again."""
    data, fields = songs["cached.mp3"], {"two_stems": "drums"}

    def entries():
        return {path for path in served.cache.glob("??/*") if not path.name.startswith(".")}
    before = entries()
    first = separate(served.url, data=data, **fields)
    made = time.monotonic()
    assert first.status_code == 200 and first.headers["x-cache"] == "miss", first.text
    entry, = entries() - before
    time.sleep(CACHE_TTL_S / 2)
    assert separate(served.url, data=data, **fields).headers["x-cache"] == "hit"
    deadline = made + CACHE_TTL_S * 1.25 + HEALTH_S + 20  # a sweep each quarter of the TTL
    while entry.exists():
        assert time.monotonic() < deadline, "an expired result is still on disk"
        time.sleep(0.2)
    assert time.monotonic() - made > CACHE_TTL_S - 1, "removed before its time"
    again = separate(served.url, data=data, **fields)
    assert again.status_code == 200 and again.headers["x-cache"] == "miss", again.text


def test_a_deleted_job_leaves_no_copy_in_the_cache(service, songs):
    """DELETE of a finished job removes its stems' copy from the result cache too (on every
    node: one here, shared by both Ingress replicas): the same song, options and key are
    separated again afterwards, where before the DELETE they were a hit."""
    data, fields = songs["cached.mp3"], {"two_stems": "bass"}
    answer = requests.post(service + "/jobs", headers=auth(), timeout=60,
                           files={"audio_file": ("d.mp3", data)}, data=fields)
    done = wait_for(service, answer.json()["id"])
    assert done["status"] == "done", done
    assert separate(service, data=data, **fields).headers["x-cache"] == "hit"
    deleted = requests.delete(service + done["status_url"], headers=auth(), timeout=30)
    assert deleted.status_code == 200, deleted.text
    deadline = time.monotonic() + 30  # removed by a task on each node, not waited for
    while (again := separate(service, data=data, **fields)).headers["x-cache"] == "hit":
        assert time.monotonic() < deadline, "the deleted job's stems are still cached"
        time.sleep(0.5)
    assert again.status_code == 200 and again.headers["x-cache"] == "miss", again.text
