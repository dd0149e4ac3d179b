"""Schemathesis fuzzes the API from the app's own OpenAPI schema, on SQLite and PostgreSQL: whatever it
sends (valid and invalid data, with a valid rater token, API key or admin token), no answer is a 5xx, and
answers with a documented status match their documented schema."""

import hypothesis.strategies as st
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from lm_gym.feedback.store import NewItem
from lm_gym.feedback.web import create_app

ADMIN = "fuzz-admin-token-0123456789"
EXAMPLES_PER_OPERATION = 60


def test_api_never_answers_5xx(feedback_store):
    feedback_store.add_items([NewItem("Say hi", "Hi!"), NewItem("Pick", "x", "y", "m1", "m2")])
    rater, key = feedback_store.invite("fuzzer")[1], feedback_store.invite("shop", role="app")[1]
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(feedback_store, ADMIN))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/ratings", "/api/comparisons", "/api/signals"}
    for operation in operations:
        token = ADMIN if operation.path.startswith("/api/admin") else rater
        headers = {"Authorization": f"Bearer {token}", "X-API-Key": key}
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance])

        fuzz()
