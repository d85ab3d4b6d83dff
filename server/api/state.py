"""What one app instance holds (settings, metrics, admission, codec, its engine) and the stream defaults
it derives from the model and the settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import EngineDeadError
from ditstream.engine.limits import EngineLimits, validate_stream
from ditstream.server.api.admission import Admission
from ditstream.server.codec import Codec
from ditstream.server.engine_client import EngineClient
from ditstream.server.metrics import Metrics
from ditstream.server.settings import Settings

#: ``defaults`` keys a new stream takes from the model.
STREAM_DEFAULT_KEYS = ("prompt", "width", "height", "steps", "strength", "guidance_scale", "seed")


#: Stream size when neither the model nor the server states one (the null engine).
FALLBACK_SIZE = 512


_STREAM_CONFIG_DEFAULTS = StreamConfig().fields()


@dataclass
class AppState:
    """What routes and sessions share (one per app)."""

    settings: Settings
    metrics: Metrics
    admission: Admission
    codec: Codec
    runner: EngineClient | None = None
    shutting_down: bool = False
    sessions: set[Any] = field(default_factory=set)
    #: WebRTC sessions by id (``server/live/webrtc_session.py``): WHEP and live config find them here.
    webrtc: dict[str, Any] = field(default_factory=dict)
    #: Every live stream's ``LiveSession`` by session id, whatever its transport (the outputs routes find
    #: sessions here).
    live: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        """Alive, warm (every shape the backend will run prepared) and not shutting down."""
        return self.runner is not None and self.runner.ready and not self.shutting_down

    @property
    def warming(self) -> list[str]:
        """Shapes the engine still warms before it is ready (empty once warm, or for an engine without any)."""
        if self.runner is None or not self.runner.alive:
            return []
        return list(self.runner.warming)

    def require_engine(self) -> EngineClient:
        if self.runner is None or not self.runner.alive:
            raise EngineDeadError("the engine is not running")
        return self.runner

    @property
    def limits(self) -> EngineLimits:
        """The engine's limits bounded by the server's own (an injected engine may allow more)."""
        return self.require_engine().limits.tightened(max_pixels=self.settings.max_pixels,
                                                      max_prompt_chars=self.settings.max_prompt_chars)

    def validate(self, cfg: StreamConfig) -> StreamConfig:
        """The edge: every stream and job config is validated here, once, before anything is queued
        (``engine.limits.validate_stream``); the engine below takes it on trust."""
        return validate_stream(cfg, self.limits)

    def model_defaults(self) -> dict[str, Any]:
        """The engine's model defaults (``ditstream.json`` over the loader's fallbacks; ``{}`` for none)."""
        info = self.runner.info if self.runner is not None else {}
        return {k: v for k, v in (info.get("defaults") or {}).items() if k in STREAM_DEFAULT_KEYS}

    def stream_defaults(self) -> dict[str, Any]:
        """Stream settings a new session starts with: the model's defaults, the size overridden by
        the server's ``--width``/``--height`` when given (512² for an engine that states none)."""
        d: dict[str, Any] = {"width": FALLBACK_SIZE, "height": FALLBACK_SIZE, **self.model_defaults()}
        limits = self.runner.limits if self.runner is not None else None
        if limits is not None and limits.profile.sizes and not limits.fits_profile(int(d["width"]), int(d["height"])):
            # Built for other sizes (-r/--resolution): start streams at the profile's first (opt) size.
            d["width"], d["height"] = limits.profile.sizes[0]
        if self.settings.default_width is not None:
            d["width"] = self.settings.default_width
        if self.settings.default_height is not None:
            d["height"] = self.settings.default_height
        return d

    def model_card(self) -> dict[str, Any]:
        """What ``ready`` and ``GET /v1/models`` say about the model: name, where it runs, its native
        size and size multiple, and the settings a new stream starts with (``docs/protocol.md``)."""
        info = self.runner.info if self.runner is not None else {}
        own = self.model_defaults()
        start = self.stream_defaults()
        native = f"{own['width']}x{own['height']}" if "width" in own and "height" in own else None
        return {"model": info.get("model") or self.settings.model, "backend": info.get("backend"),
                "device": info.get("device"), "dtype": info.get("dtype"), "native_size": native,
                "size_multiple": info.get("size_multiple"), "loras": dict(info.get("loras") or {}),
                "defaults": {k: start.get(k, _STREAM_CONFIG_DEFAULTS[k])
                             for k in ("prompt", "width", "height", "steps", "strength", "guidance_scale")}}


def state_of(app: Any) -> AppState:
    return app.state.ditstream
