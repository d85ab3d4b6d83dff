"""The one table that maps every error to its HTTP status, WebSocket close code and body.

Engine errors (``engine.errors``) and the few protocol errors only the server can detect are
looked up by walking the class's MRO, so a subclass inherits its parent's mapping unless it has
its own row. ``tests/test_server_errors.py`` asserts that every class in ``ALL_ERRORS`` (and in
``SERVER_ERRORS``) has a row.

WebSocket semantics: ``close_code=None`` means "bad input": the client gets the in-band error
message ``{"type":"error","code":...,"message":...}`` and the stream goes on. A close code
means the error ends the socket (after the same in-band message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditstream.engine.errors import (
    ALL_ERRORS,
    AuthError,
    BackendUnavailableError,
    CancelledError,
    DitstreamError,
    EngineDeadError,
    GenerationError,
    ImageDecodeError,
    ImageTooLargeError,
    ModelLoadError,
    OverloadedError,
    PayloadTooLargeError,
    ValidationError,
)

# Named WebSocket close codes (RFC 6455 / IANA registry).
WS_NORMAL = 1000
WS_GOING_AWAY = 1001
WS_UNSUPPORTED_DATA = 1003
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_TRY_AGAIN_LATER = 1013


class MalformedMessageError(ValidationError):
    """A control message that is not JSON, or a frame header that cannot be parsed."""

    error_type = "malformed_message"


class UnknownMessageTypeError(ValidationError):
    """A control message whose ``type`` the protocol does not define."""

    error_type = "unknown_message_type"


class ProtocolAbuseError(DitstreamError):
    """Too many bad messages in a row: the socket is closed instead of answering each one."""

    error_type = "protocol_abuse"


class NotFoundError(DitstreamError):
    """An unknown model or resource was asked for."""

    error_type = "not_found"


class WebRTCUnavailableError(DitstreamError):
    """A WebRTC endpoint was called but the ``webrtc`` extra (aiortc, PyAV) is not installed."""

    error_type = "webrtc_unavailable"


class OutputsDisabledError(DitstreamError):
    """An outputs route on a server whose operator did not turn outputs on (``--outputs``)."""

    error_type = "outputs_disabled"


class OutputRefusedError(DitstreamError):
    """An output the operator's policy refuses: a kind not in ``--outputs``, a host not allowed."""

    error_type = "output_refused"


class InvalidOutputError(ValidationError):
    """An output URL that is no output at all: unknown scheme, no host, a file name with a path."""

    error_type = "invalid_output"


class OutputExistsError(DitstreamError):
    """A ``file:`` output whose name is taken in the record folder (recordings are never overwritten)."""

    error_type = "output_exists"


class OutputsUnavailableError(DitstreamError):
    """Outputs asked of a gateway: they run in the all-in-one server only (docs/deploy.md, "Outputs").
    A 403 like outputs that are off (a gateway refuses ``--outputs`` at start), not a 5xx: nothing failed."""

    error_type = "outputs_unavailable"


SERVER_ERRORS: tuple[type[DitstreamError], ...] = (
    MalformedMessageError, UnknownMessageTypeError, ProtocolAbuseError, NotFoundError, WebRTCUnavailableError,
    OutputsDisabledError, OutputRefusedError, InvalidOutputError, OutputExistsError, OutputsUnavailableError,
)


@dataclass(frozen=True)
class ErrorMapping:
    """How one error class reaches a client."""

    http_status: int
    #: ``None``: in-band error only, the stream goes on.
    ws_close: int | None
    #: OpenAI error ``type`` for REST bodies.
    openai_type: str


ERROR_TABLE: dict[type[DitstreamError], ErrorMapping] = {
    DitstreamError: ErrorMapping(500, WS_INTERNAL_ERROR, "server_error"),
    ValidationError: ErrorMapping(422, None, "invalid_request_error"),
    ImageDecodeError: ErrorMapping(400, None, "invalid_request_error"),
    ImageTooLargeError: ErrorMapping(413, None, "invalid_request_error"),
    MalformedMessageError: ErrorMapping(400, None, "invalid_request_error"),
    UnknownMessageTypeError: ErrorMapping(400, None, "invalid_request_error"),
    PayloadTooLargeError: ErrorMapping(413, WS_MESSAGE_TOO_BIG, "invalid_request_error"),
    ProtocolAbuseError: ErrorMapping(400, WS_UNSUPPORTED_DATA, "invalid_request_error"),
    AuthError: ErrorMapping(401, WS_POLICY_VIOLATION, "authentication_error"),
    NotFoundError: ErrorMapping(404, None, "invalid_request_error"),
    WebRTCUnavailableError: ErrorMapping(501, None, "server_error"),
    OutputsDisabledError: ErrorMapping(403, None, "permission_error"),
    OutputRefusedError: ErrorMapping(403, None, "permission_error"),
    InvalidOutputError: ErrorMapping(422, None, "invalid_request_error"),
    OutputExistsError: ErrorMapping(409, None, "invalid_request_error"),
    OutputsUnavailableError: ErrorMapping(403, None, "permission_error"),
    OverloadedError: ErrorMapping(429, WS_TRY_AGAIN_LATER, "rate_limit_error"),
    ModelLoadError: ErrorMapping(503, WS_INTERNAL_ERROR, "server_error"),
    BackendUnavailableError: ErrorMapping(503, WS_INTERNAL_ERROR, "server_error"),
    GenerationError: ErrorMapping(500, None, "server_error"),
    EngineDeadError: ErrorMapping(503, WS_INTERNAL_ERROR, "server_error"),
    CancelledError: ErrorMapping(499, WS_GOING_AWAY, "server_error"),
}


def mapping_for(exc: BaseException | type[BaseException]) -> ErrorMapping:
    """The row of the nearest class in ``exc``'s MRO (unknown exceptions map as internal errors)."""
    cls = exc if isinstance(exc, type) else type(exc)
    for klass in cls.__mro__:
        row = ERROR_TABLE.get(klass)  # type: ignore[arg-type]
        if row is not None:
            return row
    return ERROR_TABLE[DitstreamError]


def ws_error(exc: DitstreamError) -> dict[str, Any]:
    """The in-band WebSocket error message."""
    return exc.to_dict()


def rest_error_body(exc: DitstreamError) -> dict[str, Any]:
    """An OpenAI-shaped error body (``openai`` raises the matching ``APIStatusError`` from it)."""
    return {"error": {"message": exc.message, "type": mapping_for(exc).openai_type,
                      "code": exc.error_type, "param": exc.field}}


def rest_headers(exc: DitstreamError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def all_error_classes() -> tuple[type[DitstreamError], ...]:
    return (*ALL_ERRORS, *SERVER_ERRORS)
