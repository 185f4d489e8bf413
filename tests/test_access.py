"""Access control over real HTTP: API keys from the environment and from a keys file (rotated
while the service runs), 401 JSON without a valid one, health and docs open, a per-key
concurrency limit answering 429 with Retry-After, CORS only for the configured origins."""
import threading
import time

import pytest
import requests

from audio_files import encode, tone
from serve_graph.access import ConcurrencyLimit, bearer_token, matching_key
from serve_graph.jobs import key_id
from serve_graph.launch import write_config
from serve_process import UNCACHED, ServeProcess, free_port
from test_service import scrape, total

pytestmark = pytest.mark.serve
KEYS = ("key-one", "key-two")
BILLED_KEY = "key-billed"  # no other test's: its counts move with its own requests alone
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    """The service's keys file (beside the keys of its environment)."""
    path = tmp_path_factory.mktemp("keys") / "api_keys"
    path.write_text("file-key-one\n")
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo, keys_file):
    folder = tmp_path_factory.mktemp("access")
    port = free_port()
    config = write_config(folder / "serve_config.yaml", port=port, host="127.0.0.1",
                          args={"max_concurrent_per_client": 1, "cors_origins": [ORIGIN],
                                "api_keys_file": str(keys_file), **UNCACHED})
    server = ServeProcess(config, port, {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo),
                                         "SERVE_GRAPH_API_KEYS": ",".join((*KEYS, BILLED_KEY))},
                          folder / "serve.log")
    yield server.url
    server.kill()


@pytest.fixture(scope="module")
def song():
    return encode(tone(1.5, 44100, 2), 44100, "mp3")


def separate(url, data, key=None, **fields):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + "/separate", files={"audio_file": ("a.mp3", data)},
                         data=fields, headers=headers, timeout=120)


def test_health_and_docs_stay_open(service):
    for path in ("/", "/healthz", "/readyz", "/openapi.json", "/docs"):
        assert requests.get(service + path, timeout=30).status_code == 200, path


@pytest.mark.parametrize("key", [None, "wrong", "key-one-but-longer"])
def test_work_needs_a_valid_key(service, song, key):
    response = separate(service, song, key)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(service + "/stats", timeout=30).status_code == 401


def test_keys_added_to_or_revoked_from_the_keys_file_work_without_a_restart(service,
                                                                             keys_file):
    """As a mounted secret is rotated: the file's new key works and its old one is refused
    within seconds; a file emptied refuses its keys and never opens the service."""
    def status(key) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(service + "/stats", headers=headers, timeout=30).status_code

    def until(key, expected: int) -> None:
        deadline = time.monotonic() + 20
        while status(key) != expected:
            assert time.monotonic() < deadline, (key, expected)
            time.sleep(0.5)

    assert (status("file-key-one"), status("file-key-two")) == (200, 401)
    keys_file.write_text("file-key-two\n")  # one key revoked, one added
    until("file-key-two", 200)
    assert status("file-key-one") == 401 and status(KEYS[0]) == 200  # the environment's kept
    keys_file.write_text("")
    until("file-key-two", 401)
    assert status(None) == 401 and status(KEYS[1]) == 200


@pytest.mark.parametrize("key", KEYS)
def test_each_key_works(service, song, key):
    assert separate(service, song, key, two_stems="vocals").status_code == 200


def test_each_key_s_audio_is_counted_for_billing(service, song):
    """`/metrics` counts the seconds of audio answered to each key, by the key's id (a hash:
    the key itself never appears there)."""
    sample = ("ray_serve_graph_client_audio_seconds_total",
              {"client": key_id(BILLED_KEY), "answer": "separated", "model": "htdemucs"})
    seconds = sum(float(separate(service, song, BILLED_KEY).headers["x-audio-seconds"])
                  for _ in range(2))
    deadline = time.monotonic() + 60
    while (counted := total(after := scrape(service), sample[0], **sample[1])) < seconds:
        assert time.monotonic() < deadline, counted
        time.sleep(0.5)
    assert counted == pytest.approx(seconds, abs=1e-3)
    assert not any(value in (*KEYS, BILLED_KEY) for _, labels in after for _, value in labels)


def test_a_second_request_of_one_key_gets_429_while_other_keys_go_on(service, song):
    long_song = encode(tone(15., 44100, 2, seed=3), 44100, "mp3")
    first = {}
    worker = threading.Thread(target=lambda: first.update(
        response=separate(service, long_song, KEYS[0], shifts=4)))  # runs for seconds
    worker.start()
    time.sleep(1.)
    refused = separate(service, song, KEYS[0])
    other = separate(service, song, KEYS[1])
    worker.join()
    assert first["response"].status_code == 200
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "too_many_requests"
    assert int(refused.headers["Retry-After"]) > 0
    assert other.status_code == 200
    assert separate(service, song, KEYS[0]).status_code == 200  # its turn again


def test_cors_only_for_configured_origins(service):
    def preflight(origin):
        return requests.options(service + "/separate", timeout=30, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
    allowed = preflight(ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    other = preflight("https://elsewhere.example")
    assert "Access-Control-Allow-Origin" not in other.headers


def test_a_web_app_may_cancel_retry_resume_and_read_the_answers_headers(service):
    """What a web app of an allowed origin needs beyond a POST: DELETE (cancel, forget),
    Idempotency-Key, Range; and reading the file name, range, retry and facts headers."""
    cancel = requests.options(service + "/jobs/" + "ab" * 16, timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization, idempotency-key, range, if-range"})
    assert cancel.status_code == 200, cancel.text
    assert "DELETE" in cancel.headers["Access-Control-Allow-Methods"]
    allowed = cancel.headers["Access-Control-Allow-Headers"].lower()
    assert {"idempotency-key", "range", "if-range"} <= set(allowed.replace(" ", "").split(","))
    answer = requests.get(service + "/", headers={"Origin": ORIGIN}, timeout=30)
    exposed = set(answer.headers["Access-Control-Expose-Headers"].lower().replace(" ", "")
                  .split(","))
    assert {"content-disposition", "content-range", "location", "retry-after",
            "idempotent-replayed", "x-audio-seconds"} <= exposed


def test_key_matching_and_limit_units():
    assert bearer_token("Bearer abc ") == "abc" and bearer_token("Basic abc") is None
    assert bearer_token(None) is None and bearer_token("Bearer") is None
    assert matching_key(KEYS, "key-two") == "key-two"
    assert matching_key(KEYS, "key-") is None and matching_key(KEYS, None) is None
    limit = ConcurrencyLimit(2)
    assert limit.try_enter("a") and limit.try_enter("a") and not limit.try_enter("a")
    assert limit.try_enter("b")
    limit.leave("a")
    assert limit.try_enter("a")
    assert all(ConcurrencyLimit(0).try_enter("a") for _ in range(100))
