"""WebRTC signalling: WHIP ingest, WHEP playback, live config (``docs/protocol.md``, "WebRTC").

* ``POST /v1/whip`` (``Content-Type: application/sdp``; config as query parameters and/or a JSON
  ``X-Ditstream-Config`` header) → ``201`` + SDP answer + ``Location: /v1/whip/{session}``;
  ``DELETE`` on it ends the session, ``GET`` says its state (once ended, a 404 saying why: "DTLS
  failed: <reason>", ``webrtc_dtls.py``); ``PATCH`` (trickle ICE) → ``405``: the server's answer carries
  every candidate (RFC 9725 lets a server decline trickle).
* ``POST /v1/whep/{session}`` (a recvonly offer) → ``201`` + answer + ``Location:
  /v1/whep/{session}/{viewer}``; ``DELETE`` on it hangs that viewer up.
* ``POST /v1/sessions/{session}/config``: the WebSocket ``config`` message's fields, same validation
  and errors; answers once the engine applied it.
* ``GET /v1/webrtc/ice-servers``: the STUN/TURN servers a client should use, TURN credentials minted
  for it (``ice_servers.py``); the WHIP/WHEP answers carry the same as ``Link`` headers (RFC 9725).

A session holds an admission permit like a WebSocket stream; over ``--max-streams`` the WHIP POST is
refused with ``503`` + ``Retry-After`` (RFC 9725 §4.6). Without the ``webrtc`` extra every endpoint
answers ``501`` naming it. The session itself is ``webrtc_session.py``; nothing here imports aiortc
until a request needs it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ditstream.engine.errors import DitstreamError, OverloadedError
from ditstream.server.api.state import AppState, state_of
from ditstream.server.errors import (
    MalformedMessageError,
    NotFoundError,
    WebRTCUnavailableError,
    rest_error_body,
    rest_headers,
)
from ditstream.server.live.ice_servers import client_ice_servers, link_header
from ditstream.server.live.protocol import ConfigMessage, parse_control
from ditstream.server.live.session import admit
from ditstream.server.live.webrtc_ended import EndedSessions
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)
router = APIRouter(tags=["webrtc"])

INSTALL_HINT = "WebRTC needs the webrtc extra: pip install 'ditstream[webrtc]'"
SDP = "application/sdp"
CONFIG_HEADER = "x-ditstream-config"
_SDP_BODY = {"requestBody": {"required": True, "content": {SDP: {"schema": {"type": "string"}}}}}
_ICE_INSTALLED: list[Any] = []
#: What every WebRTC route may answer besides success (the server's error table: server/errors.py).
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad SDP, Content-Type or JSON (the message names it)"},
    401: {"description": "missing or invalid API key"},
    404: {"description": "no such session or viewer (it ended, or never was)"},
    413: {"description": "request body over the size limit"},
    422: {"description": "invalid config field (the message names it)"},
    501: {"description": "the webrtc extra is not installed (pip install 'ditstream[webrtc]')"},
    503: {"description": "at --max-streams or viewers, or the engine is not running (Retry-After)"},
}


def _session_module() -> Any:
    """``webrtc_session`` (aiortc imported), ICE settings applied once; raises without the extra."""
    try:
        import aiortc  # noqa: F401
        import av  # noqa: F401
    except ImportError as exc:
        raise WebRTCUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
    from ditstream.server.live import webrtc_ice, webrtc_session

    return webrtc_ice, webrtc_session


def _error(exc: DitstreamError, status: int) -> JSONResponse:
    return JSONResponse(rest_error_body(exc), status_code=status, headers=rest_headers(exc))


def _prepare(state: AppState) -> Any:
    ice, session = _session_module()
    s = state.settings
    wanted = (s.webrtc_ports(), s.webrtc_public_host, s.webrtc_peer_timeout_s)
    if _ICE_INSTALLED != [wanted]:
        ice.install(*wanted)
        _ICE_INSTALLED[:] = [wanted]
    return session


async def _offer(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != SDP:
        raise MalformedMessageError(f"Content-Type must be {SDP}, got {ctype or 'none'!r}", field="content-type")
    try:
        return (await request.body()).decode()
    except UnicodeDecodeError as exc:
        raise MalformedMessageError("the SDP offer is not UTF-8 text", field="sdp") from exc


def _initial_config(request: Request) -> ConfigMessage:
    """The stream's config from the JSON ``X-Ditstream-Config`` header and the query (which wins)."""
    fields: dict[str, Any] = {}
    header = request.headers.get(CONFIG_HEADER)
    if header:
        try:
            fields = json.loads(header)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise MalformedMessageError(f"X-Ditstream-Config is not valid JSON: {exc}",
                                        field="X-Ditstream-Config") from exc
        if not isinstance(fields, dict):
            raise MalformedMessageError("X-Ditstream-Config must be a JSON object", field="X-Ditstream-Config")
    fields.update({k: v for k, v in request.query_params.items() if k != "token"})
    msg = parse_control(json.dumps({**fields, "type": "config"}))
    assert isinstance(msg, ConfigMessage)
    return msg


def _links(state: AppState) -> dict[str, str]:
    """RFC 9725: the ICE servers (TURN credentials minted now) as ``Link`` headers of an answer."""
    link = link_header(client_ice_servers(state.settings)[0])
    return {"Link": link} if link else {}


class IceServerModel(BaseModel):
    urls: list[str] = Field(description="stun:, turn: or turns: URLs of one server.")
    username: str | None = Field(None, description="TURN only: minted for this client, valid until expires_at.")
    credential: str | None = Field(None, description="TURN only: the password for username.")


class IceServers(BaseModel):
    ice_servers: list[IceServerModel] = Field(description="RTCConfiguration.iceServers, as the browser takes it.")
    expires_at: int | None = Field(None, description="Unix time the TURN credentials expire (null: no TURN).")


@router.get("/v1/webrtc/ice-servers", response_model=IceServers, responses={401: _ERRORS[401]},
            summary="The STUN/TURN servers a WebRTC client should use (TURN credentials minted per call).")
async def ice_servers(request: Request) -> IceServers:
    servers, expires_at = client_ice_servers(state_of(request.app).settings)
    return IceServers(ice_servers=[IceServerModel(**s.as_dict()) for s in servers], expires_at=expires_at)


def _session(state: AppState, session: str) -> Any:
    """The live session, or a 404 that says why it ended when it did (``webrtc_ended.py``)."""
    found = state.webrtc.get(session)
    if found is None:
        ended = EndedSessions.of(state).reason(session)
        if ended is not None:
            raise NotFoundError(f"WebRTC session {session!r} ended: {ended}", field="session")
        raise NotFoundError(f"no WebRTC session {session!r} (it ended, or never was)", field="session")
    return found


@router.post("/v1/whip", status_code=201, response_class=Response, openapi_extra=_SDP_BODY,
             summary="WHIP: publish a video track into a new live stream; the answer is the SDP.",
             responses={**_ERRORS, 201: {"content": {SDP: {}}, "description": "session created (Location)"}})
async def whip(request: Request) -> Response:
    state = state_of(request.app)
    module = _prepare(state)  # 501 without the extra
    try:
        offer = await _offer(request)
        msg = _initial_config(request)
        permit = admit(state)
    except OverloadedError as exc:  # WHIP says 503 (not REST's 429): the server, not the client, is full
        return _error(exc, 503)
    session, sdp = await module.WebRTCSession.publish(state, permit, offer, msg)
    return Response(sdp, status_code=201, media_type=SDP,
                    headers={"Location": f"/v1/whip/{session.id}", "X-Ditstream-Session": session.id,
                             **_links(state)})


class SessionStatus(BaseModel):
    session: str = Field(description="The session id (the Location's last part).")
    state: str = Field(description="The publisher's peer connection: new, connecting, connected, failed, closed.")
    viewers: int = Field(description="WHEP viewers watching it.")
    failure: str | None = Field(None, description="Why the publisher's peer failed, e.g. 'DTLS failed: ...'.")


@router.get("/v1/whip/{session}", response_model=SessionStatus, responses=_ERRORS,
            summary="WHIP: the session's state; once it ended, a 404 says why.")
async def whip_status(request: Request, session: str) -> SessionStatus:
    return SessionStatus(**_session(state_of(request.app), session).status())


@router.delete("/v1/whip/{session}", response_model=SessionStatus, responses=_ERRORS,
               summary="WHIP: end the session (its stream and viewers) and answer its last state.")
async def whip_end(request: Request, session: str) -> SessionStatus:
    """Two routes, not one for both methods: OpenAPI wants one operation id per operation, and
    FastAPI gives a two-method route the same id twice."""
    found = _session(state_of(request.app), session)
    await found.close("DELETE")
    return SessionStatus(**found.status())


async def trickle(request: Request) -> Response:
    """A 405 in the app's one error shape (``app._http_error``), naming why and the methods there are."""
    raise HTTPException(405, "trickle ICE is not supported: the SDP answer already holds every server candidate",
                        headers={"Allow": "GET, DELETE" if request.url.path.startswith("/v1/whip/") else "DELETE"})


@router.post("/v1/whep/{session}", status_code=201, response_class=Response, openapi_extra=_SDP_BODY,
             summary="WHEP: watch a session's output frames as a video track.",
             responses={**_ERRORS, 201: {"content": {SDP: {}}, "description": "viewer created (Location)"}})
async def whep(request: Request, session: str) -> Response:
    state = state_of(request.app)
    _prepare(state)  # 501 without the extra
    offer = await _offer(request)
    try:
        viewer, sdp = await _session(state, session).add_viewer(offer)
    except OverloadedError as exc:
        return _error(exc, 503)
    return Response(sdp, status_code=201, media_type=SDP,
                    headers={"Location": f"/v1/whep/{session}/{viewer}", **_links(state)})


@router.delete("/v1/whep/{session}/{viewer}", summary="WHEP: hang a viewer up.", responses=_ERRORS)
async def whep_delete(request: Request, session: str, viewer: str) -> Response:
    if not await _session(state_of(request.app), session).remove_viewer(viewer):
        raise NotFoundError(f"no viewer {viewer!r} of session {session!r}", field="viewer")
    return Response(status_code=200)


@router.post("/v1/sessions/{session}/config", responses=_ERRORS,
             summary="Change a WebRTC session's config (the WebSocket config message's fields).")
async def session_config(request: Request, session: str) -> JSONResponse:
    state = state_of(request.app)
    found = _session(state, session)
    body = (await request.body()).decode("utf-8", "replace")
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MalformedMessageError(f"request body is not valid JSON: {exc}", field="body") from exc
    if not isinstance(raw, dict):
        raise MalformedMessageError("the config must be a JSON object", field="body")
    msg = parse_control(json.dumps({**raw, "type": "config"}))
    assert isinstance(msg, ConfigMessage)
    applied = await found.apply_config(msg)
    return JSONResponse({"type": "config", "session": session, "applied": found.config_dict(applied)})


# Trickle ICE is not supported (RFC 9725 allows 405): the answer holds every candidate. Left out of
# the schema, where it would document a method whose only answer is "not allowed"; added after the
# GET/DELETE and DELETE routes so that another method's 405 names those (the first route of a path answers it).
router.add_api_route("/v1/whip/{session}", trickle, methods=["PATCH"], include_in_schema=False)


async def whip_not_allowed(request: Request) -> Response:
    """GET and DELETE are two routes (one operation id each), and Starlette's 405 would list only the
    first one's method: the session resource answers every other method here, listing both."""
    raise HTTPException(405, f"{request.method} is not allowed here: GET the session's state or DELETE it",
                        headers={"Allow": "GET, DELETE"})


router.add_api_route("/v1/whip/{session}", whip_not_allowed, methods=["POST", "PUT", "OPTIONS", "TRACE"],
                     include_in_schema=False)
router.add_api_route("/v1/whep/{session}/{viewer}", trickle, methods=["PATCH"], include_in_schema=False)
