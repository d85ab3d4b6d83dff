"""Schemathesis over the app's own OpenAPI schema, in-process (ASGI), with the lifespan running.

Every operation in ``/openapi.json`` is driven with schema-valid and schema-violating requests
(hypothesis-generated) and every answer is checked: no 5xx, a documented status code, a documented
content type and headers, a body that matches the documented schema, and schema-violating input
refused. Run once without keys and once with keys (the key presented), so the auth middleware sits
in the path of every generated request too; and both again in gateway mode (the app in front of a
``ditstream worker`` process over Redis), where every image request is a job on the wire.

Left out on purpose: ``positive_data_acceptance``. Several limits depend on the model and the
settings — sizes must be multiples of the model's size multiple and under ``max_pixels``, ``n`` under
``max_images_per_request``, the prompt under ``max_prompt_chars`` — and a static schema cannot state
them; such requests get a 422 naming the field, which the other checks still validate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from ditstream.engine.config import EngineConfig
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.api.factory import load_runner
from ditstream.server.settings import Settings
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

KEY = "sk-schema-0123456789"
#: Examples per operation and configuration; enough to reach the edge cases in well under a minute.
MAX_EXAMPLES = 60


#: (mode, auth) runs: both modes, each without and with keys (a gateway run costs ~5 s more than an
#: engine run: the null fleet is shared by the session).
RUNS = [(mode, auth) for mode in ("engine", "gateway") for auth in ("open", "keys")]


@pytest.fixture(params=RUNS, ids=[f"{mode}-{auth}" for mode, auth in RUNS])
def api_schema(request: pytest.FixtureRequest) -> Iterator[schemathesis.schemas.BaseSchema]:
    """A fresh app per run, small limits so big sizes are refused quickly: a null engine in process, or
    a gateway (``load_runner`` as in ``ditstream serve --redis``) on the session's null fleet (a
    ``redis-server`` and a ``ditstream worker --model null`` process, ``tests/serverkit.py``)."""
    mode, auth = request.param
    keys = [KEY] if auth == "keys" else []
    limits: dict[str, Any] = dict(default_width=64, default_height=64, max_pixels=256 * 256,
                                  max_upload_bytes=64 * 1024, api_keys=keys, job_timeout_s=30.0)
    if mode == "engine":
        runner = null_runner(EngineConfig(max_pixels=256 * 256))
        app = create_app(Settings(model="null", **limits), runner)
    else:
        fleet = request.getfixturevalue("null_fleet")
        settings = fleet.settings(**limits)
        runner = load_runner(settings)
        app = create_app(settings, runner)
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    # The key as the credentials of the schema's "bearer" scheme: headers given to ``from_asgi`` only
    # load the schema, and a generated request would carry a generated Authorization header instead.
    auth = {"auth": {"openapi": {"bearer": {"bearer": KEY}}}} if keys else {}
    # Loading the schema is the app's first request: its lifespan starts here and runs until the test ends.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(auth),
                                            headers=headers)
    if mode == "gateway":  # no generated request may reach a gateway that does not see its worker yet
        fleet.await_workers(runner, lambda: runner.ready)
        assert runner.info["mode"] == "gateway", "the app must reach its engine through Redis"
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

