"""Outputs from the server: restream a live session (RTMP, SRT) or record it (MP4) — the routes
(``docs/protocol.md``, "Outputs"; the outputs themselves are ``server/live/outputs.py``).

* ``GET /v1/outputs``: whether this server allows outputs, and which kinds (the page shows its panel by it).
* ``POST /v1/sessions/{session}/outputs`` ``{"url": ...}`` → ``201`` + the output (``Location``).
* ``GET /v1/sessions/{session}/outputs``: every output of the session, with state, frames, bitrate.
* ``DELETE /v1/sessions/{session}/outputs/{output}``: stop one (queued frames written, container
  closed); answers its final state.

Off unless the operator allows them (``403 outputs_disabled``); a URL the policy refuses is ``403
output_refused`` or ``422 invalid_output`` naming why (``outputs_policy.py``); behind the API keys
like every route. A gateway answers ``403 outputs_unavailable``: a session lives on a worker and
moves between workers, and the gateway never decodes frames (docs/deploy.md, "Outputs"). A 4xx, not
501: it is the server's configuration that refuses, as when outputs are off, and no route of this
API answers 5xx for a request it understood (``tests/test_reliability_schema.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ditstream.server.api.state import AppState, state_of
from ditstream.server.errors import NotFoundError, OutputsDisabledError, OutputsUnavailableError
from ditstream.server.live.outputs_policy import HostPatterns, check_host, parse_target, reserve_file
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

router = APIRouter(tags=["outputs"])

#: Seconds ``DELETE`` waits for an output to finish writing before it answers.
STOP_WAIT_S = 5.0

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not JSON (malformed_message)"},
    401: {"description": "missing or invalid API key"},
    403: {"description": "outputs are off on this server (outputs_disabled), a gateway (outputs_unavailable: "
                         "all-in-one only), or the policy refuses this URL: kind, host (output_refused)"},
    404: {"description": "no such session or output"},
    409: {"description": "the recording's file name exists in the record folder (output_exists)"},
    413: {"description": "request body over the size limit"},
    422: {"description": "not an output URL: unknown scheme, no host, a file name with a path (invalid_output)"},
    429: {"description": "the session has --max-outputs outputs already"},
}


class OutputRequest(BaseModel):
    url: str = Field(max_length=2048, description="rtmp://HOST[:PORT]/APP/KEY, rtmps://..., srt://HOST:PORT[?...] "
                                                  "or file:NAME.mp4 (into the server's record folder).")


class OutputStatus(BaseModel):
    id: str = Field(description="The output's id (the Location's last part).")
    url: str = Field(description="The URL with its secrets (stream key, SRT passphrase and streamid) masked.")
    kind: str = Field(description="rtmp, srt or file.")
    state: str = Field(description="connecting (no frame written yet), live, failed (see reason) or ended.")
    reason: str | None = Field(None, description="Why it failed.")
    frames_sent: int = Field(description="Frames encoded and written.")
    frames_dropped: int = Field(description="Frames skipped because the encoder or receiver lagged.")
    bitrate_bps: int = Field(description="Bits per second written over the last 2 s (0 unless live).")
    width: int | None = Field(None, description="Encoded width (the session's first output frame's).")
    height: int | None = Field(None, description="Encoded height.")
    created_at: float = Field(description="Unix time the output was added.")


class OutputList(BaseModel):
    session: str
    outputs: list[OutputStatus]


class OutputsInfo(BaseModel):
    enabled: bool = Field(description="Whether this server takes outputs at all.")
    kinds: list[str] = Field(description="The kinds allowed: rtmp (rtmp:// and rtmps://), srt, file.")
    max_outputs: int = Field(description="Active outputs one session may hold.")
    reason: str | None = Field(None, description="Why outputs are off, when they are.")


def _allowed(state: AppState) -> None:
    """Every outputs route first: a gateway cannot, and outputs are off unless allowed (403 both)."""
    s = state.settings
    if s.redis_url:
        raise OutputsUnavailableError("outputs run in the all-in-one server only: behind a gateway a session "
                                      "lives on a worker and moves between workers (docs/deploy.md, 'Outputs')")
    if not s.outputs:
        raise OutputsDisabledError("outputs are off on this server (the operator enables them with --outputs)")


def _session(state: AppState, session: str) -> Any:
    found = state.live.get(session)
    if found is None or found.outputs is None:
        raise NotFoundError(f"no live session {session!r} (it ended, or never was)", field="session")
    return found.outputs


@router.get("/v1/outputs", response_model=OutputsInfo, responses={401: _ERRORS[401]},
            summary="Whether this server allows outputs (restreaming, recording), and which kinds.")
async def outputs_info(request: Request) -> OutputsInfo:
    s = state_of(request.app).settings
    reason = ("a gateway: outputs run in the all-in-one server only" if s.redis_url else
              None if s.outputs else "the operator did not enable outputs (--outputs)")
    enabled = reason is None
    return OutputsInfo(enabled=enabled, kinds=list(s.outputs) if enabled else [], max_outputs=s.max_outputs,
                       reason=reason)


@router.post("/v1/sessions/{session}/outputs", status_code=201, response_model=OutputStatus, responses=_ERRORS,
             summary="Restream (RTMP, SRT) or record (file:NAME.mp4) a live session's output.")
async def add_output(request: Request, session: str, body: OutputRequest) -> JSONResponse:
    state = state_of(request.app)
    _allowed(state)
    outputs = _session(state, session)
    target = parse_target(body.url, state.settings)  # 422 / 403 naming why, nothing opened
    if target.host is not None:  # resolving may wait on DNS: off the loop
        await asyncio.to_thread(check_host, target, HostPatterns.parse(state.settings.output_hosts))
    if outputs.closed:
        raise NotFoundError(f"no live session {session!r} (it ended)", field="session")
    outputs.check_room()  # 429 before a file is created for nothing
    if target.kind == "file":
        reserve_file(target)  # 409 when the name is taken
    output = outputs.add(target)
    return JSONResponse(output.snapshot(), status_code=201,
                        headers={"Location": f"/v1/sessions/{session}/outputs/{output.id}"})


@router.get("/v1/sessions/{session}/outputs", response_model=OutputList, responses=_ERRORS,
            summary="A live session's outputs: state (connecting, live, failed, ended), frames, bitrate.")
async def list_outputs(request: Request, session: str) -> OutputList:
    state = state_of(request.app)
    _allowed(state)
    return OutputList(session=session, outputs=[OutputStatus(**o) for o in _session(state, session).list()])


@router.delete("/v1/sessions/{session}/outputs/{output}", response_model=OutputStatus, responses=_ERRORS,
               summary="Stop an output (frames queued are written, the stream or file is closed).")
async def delete_output(request: Request, session: str, output: str) -> OutputStatus:
    state = state_of(request.app)
    _allowed(state)
    stopped = _session(state, session).remove(output)
    await asyncio.to_thread(stopped.join, STOP_WAIT_S)
    return OutputStatus(**stopped.snapshot())


async def _not_allowed(request: Request) -> JSONResponse:
    """Any other method on the outputs collection: a 405 that names both of its methods (Starlette's own
    405 would name only the first route's), in the app's one error shape (``app._http_error``)."""
    raise HTTPException(405, f"{request.method} is not allowed here: GET lists the outputs, POST adds one",
                        headers={"Allow": "GET, POST"})


# After the GET and POST routes, so that they answer their own methods; left out of the schema.
router.add_api_route("/v1/sessions/{session}/outputs", _not_allowed, include_in_schema=False,
                     methods=["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
