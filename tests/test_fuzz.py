"""A third-party OpenAPI fuzzer (schemathesis) against the real service: every request it
generates from /openapi.json, valid or not, gets a documented status and body, never a 5xx.

CI runs a bounded number of examples per operation; `SERVE_GRAPH_FUZZ_EXAMPLES=500 pytest
tests/test_fuzz.py` runs a long one."""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serve_graph.launch import write_config
from serve_process import ServeProcess, free_port

pytestmark = pytest.mark.serve
EXAMPLES = int(os.environ.get("SERVE_GRAPH_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    folder = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    config = write_config(folder / "serve_config.yaml", port=port, host="127.0.0.1",
                          args={"max_upload_mb": 2})
    server = ServeProcess(config, port, {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo)},
                          folder / "serve.log")
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(service + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_answer(case, service):
    """schemathesis' checks (no 5xx, documented status, content type and body schema, invalid
    data refused with 4xx), except that schema-valid data is accepted: an upload can be
    schema-valid and still not audio, which is a documented 415."""
    response = case.call_and_validate(base_url=service, timeout=120,
                                      excluded_checks=[positive_data_acceptance])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "detail"}, body
    if (case.method.upper(), case.path) == ("POST", "/separate") and response.status_code >= 400:
        assert response.status_code in (400, 413, 415, 422), response.text
