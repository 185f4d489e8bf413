"""A third-party OpenAPI fuzzer (schemathesis) against the real service: every request it
generates from /openapi.json, valid or not, gets a documented status and body, never a 5xx.

CI runs a bounded number of examples per operation; `SERVE_GRAPH_FUZZ_EXAMPLES=500 pytest
tests/test_fuzz.py` runs a long one."""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from serve_process import tiny_service

pytestmark = pytest.mark.serve
EXAMPLES = int(os.environ.get("SERVE_GRAPH_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    server = tiny_service(tmp_path_factory.mktemp("fuzz"), tiny_repo, {"max_upload_mb": 2})
    yield server.url
    server.stop()


# Schemathesis' positive-data check, with two statuses added to what it accepts for schema-valid
# data: 415, because no schema can say "bytes FFmpeg decodes as audio" (generated uploads are
# random bytes), and 413, because it cannot state the upload and duration limits either.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "415", "429", "5xx"]
"""


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(service + "/openapi.json",
                                         config=schemathesis.Config.from_str(CONFIG))


schema = schemathesis.pytest.from_fixture("api_schema")


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
