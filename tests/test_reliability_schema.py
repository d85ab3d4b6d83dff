"""Schemathesis over the app's own OpenAPI schema, in-process (ASGI), with the lifespan running.

Every operation in ``/openapi.json`` is driven with schema-valid and schema-violating requests
(hypothesis-generated) and every answer is checked: no 5xx, a documented status code, a documented
content type and headers, a body that matches the documented schema, and schema-violating input
refused. Run once without keys and once with keys (the key presented), so the auth middleware sits
in the path of every generated request too.

Left out on purpose: ``positive_data_acceptance``. Several limits depend on the model and the
settings — sizes must be multiples of the model's size multiple and under ``max_pixels``, ``n`` under
``max_images_per_request``, the prompt under ``max_prompt_chars`` — and a static schema cannot state
them; such requests get a 422 naming the field, which the other checks still validate.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from ditstream.engine.config import EngineConfig
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

KEY = "sk-schema-0123456789"
#: Examples per operation and configuration; enough to reach the edge cases in well under a minute.
MAX_EXAMPLES = 60


@pytest.fixture(params=["open", "keys"])
def api_schema(request: pytest.FixtureRequest) -> Iterator[schemathesis.schemas.BaseSchema]:
    """A fresh app per run: a null engine (no model), small limits so big sizes are refused quickly."""
    keys = [KEY] if request.param == "keys" else []
    app = create_app(Settings(model="null", default_width=64, default_height=64, max_pixels=256 * 256,
                              max_upload_bytes=64 * 1024, api_keys=keys, job_timeout_s=30.0),
                     null_runner(EngineConfig(max_pixels=256 * 256)))
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=headers)
    schema.ditstream_headers = headers  # type: ignore[attr-defined]
    yield schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schemathesis.serializer("application/sdp")
def _sdp(_ctx: object, value: object) -> bytes:
    """WHIP/WHEP bodies are SDP text: send what was generated as UTF-8 (the server must refuse junk)."""
    return value.encode() if isinstance(value, str) else str(value).encode()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_and_never_fails(case: schemathesis.Case) -> None:
    # Headers ride on a session so that the follow-up requests some checks make (an undeclared
    # method, a replay without the generated body) carry the key as well.
    with requests.Session() as session:
        session.headers.update(getattr(case.operation.schema, "ditstream_headers", {}))
        case.call_and_validate(session=session, excluded_checks=[positive_data_acceptance])

