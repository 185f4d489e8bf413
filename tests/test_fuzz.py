"""A third-party OpenAPI fuzzer (schemathesis) against the real service: every request it
generates from the service's OpenAPI document, valid or not, gets a documented status and
body, never a 5xx.

The schema is the Ingress' FastAPI document for the shipped config's models, made at collection
time (no service needed for that), and a test checks that the running service serves that very document. Schemathesis'
lazy loader (`schemathesis.pytest.from_fixture`) would read it from the running service instead,
but it renames pytest's test items through `Node._nodeid`, which pytest 9.2 (the locked
version) no longer has: `AttributeError: 'Function' object has no attribute '_nodeid'`.

CI runs a bounded number of examples per operation; `SERVE_GRAPH_FUZZ_EXAMPLES=500 pytest
tests/test_fuzz.py` runs a long one."""
import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from serve_graph.ingress import openapi_document
from serve_graph.launch import configured
from serve_graph.settings import ServiceSettings
from serve_process import tiny_service

pytestmark = pytest.mark.serve
EXAMPLES = int(os.environ.get("SERVE_GRAPH_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    server = tiny_service(tmp_path_factory.mktemp("fuzz"), tiny_repo, {"max_upload_mb": 2})
    yield server.url
    server.kill()


# Schemathesis' positive-data check, with two statuses added to what it accepts for schema-valid
# data: 415, because no schema can say "bytes FFmpeg decodes as audio" (generated uploads are
# random bytes), and 413, because it cannot state the upload and duration limits either.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "415", "429", "5xx"]
"""
SERVED_MODELS = ServiceSettings.from_args(configured()["applications"][0]["args"]).served_models
DOCUMENT = openapi_document(SERVED_MODELS)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_str(CONFIG))


def test_the_fuzzed_schema_is_the_one_served(service):
    assert requests.get(service + "/openapi.json", timeout=30).json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_answer(case, service):
    """All of schemathesis' checks: no 5xx, documented status, content type, headers and body
    schema, invalid data refused with 4xx, valid data accepted (see CONFIG)."""
    response = case.call_and_validate(base_url=service, timeout=120)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "detail"}, body
    if (case.method.upper(), case.path) == ("POST", "/separate") and response.status_code >= 400:
        assert response.status_code in (400, 404, 413, 415, 422), response.text
