"""One error hierarchy for the engine.

Each class carries a fixed ``error_type``; the server maps every class to an HTTP status and a
WebSocket close code in one table (``server/errors.py``), and a test checks that no class is missing.
"""

from __future__ import annotations


class DitstreamError(Exception):
    """Base of every error the engine raises on purpose."""

    error_type: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        out = {"type": "error", "code": self.error_type, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class ValidationError(DitstreamError):
    """A request or frame is malformed or outside the configured limits."""

    error_type = "validation_error"


class ImageDecodeError(ValidationError):
    """Bytes that should be an image are not one (corrupt, truncated or unknown format)."""

    error_type = "invalid_image"


class ImageTooLargeError(ImageDecodeError):
    """An image whose header claims more pixels than the limit (a decompression bomb, or just too big).

    Refused from the header alone, before any pixel is decoded. Same ``invalid_image`` code as a
    corrupt image, but its own row in the error table (HTTP 413; on a WebSocket the stream goes on).
    """


class PayloadTooLargeError(ValidationError):
    """An upload or message is bigger than the configured limit."""

    error_type = "payload_too_large"


class AuthError(DitstreamError):
    """Missing or wrong API key."""

    error_type = "unauthorized"


class OverloadedError(DitstreamError):
    """The server is at capacity (streams or queued jobs); the client should retry later."""

    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, reason: str = "capacity") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class ModelLoadError(DitstreamError):
    """A model folder or hub id is missing, partial or of the wrong kind."""

    error_type = "model_load_error"


class BackendUnavailableError(DitstreamError):
    """A requested backend cannot run here (package missing, no CUDA, build failed)."""

    error_type = "backend_unavailable"


class GenerationError(DitstreamError):
    """The model failed while producing an image (NaN output, out of memory, ...)."""

    error_type = "generation_error"


class EngineDeadError(DitstreamError):
    """The engine loop has stopped; nothing more will be processed."""

    error_type = "engine_dead"


class CancelledError(DitstreamError):
    """The work was cancelled (client gone, stream removed) before it finished."""

    error_type = "cancelled"


ALL_ERRORS: tuple[type[DitstreamError], ...] = (
    DitstreamError,
    ValidationError,
    ImageDecodeError,
    ImageTooLargeError,
    PayloadTooLargeError,
    AuthError,
    OverloadedError,
    ModelLoadError,
    BackendUnavailableError,
    GenerationError,
    EngineDeadError,
    CancelledError,
)
