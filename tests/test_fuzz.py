"""A third-party OpenAPI fuzzer (schemathesis) against the real service: every request it
generates from the service's OpenAPI document, valid or not, gets a documented status and
body, never a 5xx.

The schema is the Ingress' FastAPI document for the shipped config's models, made at collection
time (no service needed for that), and a test checks that the running service serves that very document. Schemathesis'
lazy loader (`schemathesis.pytest.from_fixture`) would read it from the running service instead,
but it renames pytest's test items through `Node._nodeid`, which pytest 9.2 (the locked
version) no longer has: `AttributeError: 'Function' object has no attribute '_nodeid'`.

Each operation is a test of its own (`test_<method>_<path>_gets_documented_answers`). CI runs
a bounded number of examples per operation; `SERVE_GRAPH_FUZZ_EXAMPLES=500 pytest
tests/test_fuzz.py` runs a long one."""
import base64
import copy
import os
import re
import time
import typing as tp
import uuid

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from standardwebhooks import Webhook

from audio_files import encode, tone
from serve_graph.api.openapi import openapi_document
from serve_graph.ingress import app
from serve_graph.launch import configured
from serve_graph.settings import ServiceSettings
from serve_process import tiny_service
from web_servers import Receiver, song_server

pytestmark = pytest.mark.serve
EXAMPLES = int(os.environ.get("SERVE_GRAPH_FUZZ_EXAMPLES", "12"))


# A song server and a webhook receiver on 127.0.0.1, started now: their URLs go into the
# fuzzed schema, which is made at collection time
SONGS = song_server({"song.wav": encode(tone(1.0, 44100, 2, seed=5), 44100, "wav16")})
HOOKS = Receiver()
SECRET = "whsec_" + base64.b64encode(b"fuzzing webhook secret, 32 bytes").decode()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    server = tiny_service(tmp_path_factory.mktemp("fuzz"), tiny_repo, {
        "max_upload_mb": 2, "url_allow_networks": ["127.0.0.1/32"], "webhook_secret": SECRET})
    yield server.url
    server.kill()
    SONGS.close()
    HOOKS.close()


# Schemathesis' positive-data check, with two statuses added to what it accepts for schema-valid
# data: 415, because no schema can say "bytes FFmpeg decodes as audio" (generated uploads are
# random bytes), and 413, because it cannot state the upload and duration limits either.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "415", "429", "5xx"]
"""
SERVED_MODELS = ServiceSettings.from_args(configured()["applications"][0]["args"]).served_models
DOCUMENT = openapi_document(app, SERVED_MODELS)


def narrowed(document: dict) -> dict:
    """`document` with `audio_url` and `callback_url` narrowed to the servers above: no schema
    can say "a URL that serves a song" (a generated URL of a host that does not resolve is
    refused, 422), so the fuzzer sends valid values that are real, and invalid ones freely."""
    document = copy.deepcopy(document)
    urls = {"audio_url": f"{SONGS.url}/song.wav", "callback_url": f"{HOOKS.url}/fuzz"}
    for name, component in document["components"]["schemas"].items():
        for field, url in urls.items():
            if name.startswith("Body_") and field in component["properties"]:
                component["properties"][field] = {"type": "string", "enum": [url]}
    return document


schema = schemathesis.openapi.from_dict(narrowed(DOCUMENT),
                                        config=schemathesis.Config.from_str(CONFIG))


def test_the_fuzzed_schema_is_the_one_served(service):
    assert requests.get(service + "/openapi.json", timeout=30).json() == DOCUMENT


def fuzz_test(operation) -> tp.Callable:
    """Schemathesis' test of `operation` alone, all of its checks: no 5xx, documented status,
    content type, headers and body schema, invalid data refused with 4xx, valid data accepted
    (see CONFIG). A test function per operation, so that each has a test id of its own
    (`schema.parametrize()` over all of them gives their items one id under pytest 9.2, which
    takes an item's id from its function's name: `--lf`, `--durations` and pytest-xdist then
    see one test)."""
    @schema.include(method=operation.method.upper(), path=operation.path).parametrize()
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def test(case, service):
        check_answer(case, service)
    return test


for _operation in (result.ok() for result in schema.get_all_operations()):
    _name = re.sub(r"[^a-z0-9]+", "_", _operation.label.lower()).strip("_")
    _name += "_root" if _operation.path == "/" else ""
    globals()[f"test_{_name}_gets_documented_answers"] = fuzz_test(_operation)


def check_answer(case, service: str) -> None:
    """One generated request sent, its answer checked (`fuzz_test`)."""
    fresh_idempotency_key(case)
    response = case.call_and_validate(base_url=service, timeout=120)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "detail"}, body
    if (case.method.upper(), case.path) == ("POST", "/separate") and response.status_code >= 400:
        assert response.status_code in (400, 404, 413, 415, 422), response.text


def fresh_idempotency_key(case) -> None:
    """A valid `Idempotency-Key` the fuzzer generated made unique: no schema can say "a key
    not used before for another request" (a reused one is refused, 422, as it must be), so
    valid keys are fresh and invalid ones are sent as generated."""
    key = (case.headers or {}).get("Idempotency-Key")
    if key is not None and re.fullmatch("[!-~]{1,255}", key):
        case.headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4().hex}"


def post_job_when_admitted(service: str, form: dict, patience_s: float = 300.0):
    """POST /jobs as a well-behaved client does: the fuzzed jobs (all from this address) may
    still hold the per-client job limit (429 `too_many_jobs`), so wait `Retry-After` seconds
    and try again, for at most `patience_s`; returns the last answer."""
    deadline = time.monotonic() + patience_s
    while True:
        answer = requests.post(service + "/jobs", data=form, timeout=60)
        if answer.status_code != 429 or time.monotonic() > deadline:
            return answer
        time.sleep(min(float(answer.headers.get("retry-after", 5)), 10.0))


def test_a_job_without_a_key_calls_back_signed_with_the_configured_secret(service):
    """Without API keys, callbacks are signed with `webhook_secret`."""
    answer = post_job_when_admitted(service, {"audio_url": f"{SONGS.url}/song.wav",
                                              "callback_url": f"{HOOKS.url}/configured"})
    assert answer.status_code == 202, answer.text
    # behind the fuzzed jobs still queued (shifts up to 20 on this machine's 2 cores)
    (_, _, headers, body), = HOOKS.wait_for("/configured", 1, timeout=300)
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["id"] == answer.json()["id"] and payload["status"] == "done"
