"""schemathesis against the server's own OpenAPI schema, with the real server, Redis and a worker running.

Every operation of ``/openapi.json`` gets generated requests (valid and invalid by the schema) with valid
credentials. Asserted per response: no 500 (``not_a_server_error``; the 502/503/504 the service documents
are its answers, not crashes, and none is expected here), only statuses the schema documents
(``status_code_conformance``: the error answers of backend/app.py are in it), a body matching its schema
(``response_schema_conformance``) and its content type (``content_type_conformance``).
"""

from __future__ import annotations

import base64

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.backend.conftest import PASSWORD, USER, FakeLabelStudio, make_stack, running

AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    fake_ls = FakeLabelStudio()
    try:
        with running(make_stack(tmp_path_factory.mktemp("schemathesis"), ls_url=fake_ls.url, OSPREY_BATCH_BUDGET_S="2",
                                OSPREY_INTERACTIVE_TIMEOUT_S="10", OSPREY_MAX_REQUEST_BYTES=str(1024 * 1024)), 0.0) as s:
            yield s
    finally:
        fake_ls.close()


@pytest.fixture(scope="module")
def api_schema(live_stack):
    assert httpx.get(live_stack.base_url + "/openapi.json", timeout=10).status_code == 401  # the schema needs auth
    schema = schemathesis.openapi.from_url(live_stack.base_url + "/openapi.json", headers=AUTH)
    schema.base_url = live_stack.base_url
    return schema


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_no_server_errors_and_no_schema_violations(api_schema, live_stack):
    """Each operation in turn (schemathesis' own pytest plugin does not load on this pytest version)."""
    ops = operations(api_schema)
    assert {op.label for op in ops} >= {"GET /health", "POST /predict", "POST /setup", "POST /webhook"}
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            case.call_and_validate(base_url=live_stack.base_url, headers=AUTH, timeout=30, checks=checks)

        run()
    assert httpx.get(live_stack.base_url + "/health", timeout=5).json()["status"] == "UP"  # still serving
