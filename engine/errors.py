"""One error hierarchy for the engine.

Each class carries a fixed ``error_type``; the server maps every class to an HTTP status and a
WebSocket close code in one table (``server/errors.py``), and a test checks that no class is missing.
"""

from __future__ import annotations

from typing import Any


class DitstreamError(Exception):
    """Base of every error the engine raises on purpose."""

    error_type: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def details(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this error with its message (``type(e)(e.message,
        **e.details())``): what a copy of it must carry across a process boundary (``server/scale/messages.py``)."""
        return {"field": self.field} if self.field else {}

    def to_dict(self) -> dict[str, Any]:
        """The in-band message: the code, the message and every detail (``field``, ``retry_after``, ...)."""
        return {"type": "error", "code": self.error_type, "message": self.message, **self.details()}


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

    def __init__(self, message: str, *, retry_after: float = 1.0, reason: str = "capacity",
                 field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after
        self.reason = reason

    def details(self) -> dict[str, Any]:
        return {**super().details(), "retry_after": self.retry_after, "reason": self.reason}


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


#: Messages of device errors after which the CUDA context is unusable (every later call fails too).
_FATAL_MARKERS = (
    "illegal memory access", "device-side assert", "unspecified launch failure", "CUDA error",
    "CUBLAS_STATUS_EXECUTION_FAILED", "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED", "uncorrectable ECC error",
    "misaligned address", "an illegal instruction",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """True when ``exc`` means the accelerator is unusable, so the engine must stop (and be restarted).

    The one place this is decided. Out-of-memory is *not* fatal (the allocator recovers; only that
    call's frames fail), nor is any other exception from a model call (a bad shape, NaN checks, a
    backend bug): those fail their own frames and jobs and the engine goes on. Fatal: CUDA errors
    other than out-of-memory (an illegal memory access, a device-side assert, a lost device), raised by
    torch as ``torch.AcceleratorError`` (torch ≥ 2.8) or as a ``RuntimeError`` naming "CUDA error".
    """
    msg = str(exc)
    if "out of memory" in msg.lower():
        return False
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
            return False
        accel = getattr(torch, "AcceleratorError", None)
        if accel is not None and isinstance(exc, accel):
            return True
    return isinstance(exc, RuntimeError) and any(m in msg for m in _FATAL_MARKERS)


def generation_failure(stage: str, exc: BaseException) -> GenerationError:
    """The error a frame or job gets when the model call it took part in failed (``exc`` is logged)."""
    if isinstance(exc, GenerationError):
        return exc
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return GenerationError(f"the model failed ({stage}): {type(exc).__name__}" + (f": {text}" if text else ""))
