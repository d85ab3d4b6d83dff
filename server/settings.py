"""Server settings: the only place in ditstream that reads the environment.

Every field can be set as ``DITSTREAM_<NAME>`` (e.g. ``DITSTREAM_MAX_STREAMS=8``,
``DITSTREAM_API_KEYS='["k1","k2"]'``) or overridden on the ``ditstream serve`` command line.
API keys are ``SecretStr`` so they never show up in logs, reprs or ``/v1/models``; the auth
middleware keeps only their sha256 digests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from ditstream.engine.config import BackendOptions, EngineConfig


class Settings(BaseSettings):
    """All-in-one server configuration (host, model, limits, keys)."""

    model_config = SettingsConfigDict(env_prefix="DITSTREAM_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8000
    #: ``demo``, a local diffusers folder or a hub id; ``null`` runs the echoing null engine.
    model: str = "demo"
    backend: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    #: Live WebSocket streams admitted at once; one more is refused with close code 1013.
    max_streams: int = Field(8, ge=1)
    #: REST images queued or in flight at once; beyond it REST answers 429 + Retry-After.
    max_queued_jobs: int = Field(16, ge=1)
    retry_after_s: int = Field(1, ge=1)
    #: Optional API keys; empty = no auth. Enforced identically on REST and WebSocket.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    #: Browser origins allowed to call the API from another site (CORS), e.g. ``https://app.example``;
    #: ``*`` allows any. Empty (the default) = no CORS headers at all: only same-origin pages.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Largest binary WebSocket message (one frame) and largest REST upload, in bytes.
    max_frame_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    #: Largest text (control) message, in bytes.
    max_control_bytes: int = Field(64 * 1024, ge=256)
    #: Largest image area accepted or generated, in pixels.
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_prompt_chars: int = Field(2000, ge=1)
    #: Largest ``n`` of one REST request.
    max_images_per_request: int = Field(4, ge=1)
    #: Seconds a REST request may wait for its images before it fails (and is cancelled).
    job_timeout_s: float = Field(120.0, gt=0)
    #: txt2img streams: default and highest frame rate the server pushes.
    default_fps: float = Field(10.0, gt=0)
    max_fps: float = Field(60.0, gt=0)
    #: Stream size new streams start at; ``None`` = the model's own (its ``ditstream.json``, else
    #: the loader's fallback 1024²; 512 for an engine that states none, e.g. ``null``).
    default_width: int | None = None
    default_height: int | None = None
    #: Engine scheduler knobs.
    max_batch: int = Field(16, ge=1)
    #: Longest a tick is held for frames expected soon, in ticks (``engine/batching.py``; env
    #: ``DITSTREAM_BATCH_WAIT``); 0 starts a tick as soon as any stream has a frame.
    batch_wait: float = Field(0.5, ge=0, le=4)
    output_queue_size: int = Field(4, ge=1)
    #: JPEG quality of stream outputs.
    jpeg_quality: int = Field(85, ge=1, le=100)
    #: Threads that decode and encode images off the event loop.
    codec_threads: int = Field(4, ge=1)
    #: torch CPU threads of the engine (0 = one per core). 1 by default: fastest on a shared CPU
    #: (``engine/threads.py``, ``docs/benchmarks.md``).
    threads: int = Field(1, ge=0)
    #: Bad messages in a row after which a socket is closed as abusive (1003).
    max_consecutive_errors: int = Field(50, ge=1)
    #: Seconds live streams get to finish at shutdown before they are closed.
    shutdown_grace_s: float = Field(5.0, ge=0)
    #: Delay per engine tick of the null engine (simulates inference time in benches).
    null_delay_s: float = Field(0.0, ge=0)

    #: WebRTC (``/v1/whip``, ``/v1/whep``; the ``webrtc`` extra, docs/deploy.md): the UDP ports ICE
    #: binds, ``"50000-50100"`` (empty = any free port); the address announced in ICE candidates in
    #: place of the interfaces' own (a public IP or the Docker host's; empty = the interfaces'); STUN
    #: servers (``stun:host:port``, comma-separated; none by default: nothing is asked of the outside);
    #: seconds a peer has to connect before its session is dropped; WHEP viewers per session; seconds
    #: a connected peer may go unheard (ICE consent checks unanswered) before it counts as gone and
    #: its session is freed (at most 1.2× this plus a second: 20 → under 25 s).
    webrtc_port_range: str | None = None
    webrtc_public_host: str | None = None
    webrtc_stun_servers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webrtc_connect_timeout_s: float = Field(20.0, gt=0)
    webrtc_max_viewers: int = Field(8, ge=1)
    webrtc_peer_timeout_s: float = Field(20.0, gt=0, le=60)
    #: TURN for clients behind NATs that block direct UDP (docs/deploy.md, "WebRTC"): the URLs handed
    #: to clients (``turn:host:3478?transport=udp``, ``turns:host:443?transport=tcp``; comma-separated)
    #: and the TURN server's shared secret (coturn ``use-auth-secret`` + ``static-auth-secret``). Each
    #: client gets a username and password valid ``webrtc_turn_ttl_s`` (the TURN REST API scheme),
    #: never the secret: at ``GET /v1/webrtc/ice-servers`` and in the WHIP/WHEP answers' ``Link``
    #: headers (RFC 9725).
    webrtc_turn_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webrtc_turn_secret: SecretStr | None = None
    webrtc_turn_ttl_s: int = Field(3600, ge=60, le=7 * 86400)

    #: Outputs from the server (``POST /v1/sessions/{id}/outputs``: restreaming and recording; docs/deploy.md,
    #: "Outputs"). Off unless listed: the kinds allowed (``rtmp`` = rtmp:// and rtmps://, ``srt``,
    #: ``file``); the hosts an output may reach (``*.twitch.tv``-style names, addresses or CIDR ranges;
    #: empty = any public host; loopback, link-local and private addresses only when their address or
    #: range is listed); the folder ``file:NAME.mp4`` records into (names only, never overwritten); the
    #: PyAV encoder and its bitrate (bits/s); outputs one session may hold.
    outputs: Annotated[list[str], NoDecode] = Field(default_factory=list)
    output_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    record_dir: str | None = None
    output_encoder: str = "libx264"
    output_bitrate: int = Field(2_500_000, ge=100_000, le=100_000_000)
    max_outputs: int = Field(4, ge=1, le=64)

    #: Scale-out (docs/deploy.md): with a Redis URL ``serve`` is a gateway and ``worker`` runs engines.
    redis_url: str | None = None
    redis_prefix: str = "ditstream"
    worker_heartbeat_s: float = Field(1.0, gt=0)
    #: A worker silent this long is dead: its sessions are re-pinned, its jobs re-claimed.
    worker_ttl_s: float = Field(5.0, gt=0)
    job_claim_idle_s: float = Field(5.0, gt=0)
    #: A gateway's liveness key lives this long unrefreshed (it is refreshed every 0.25 s): once it
    #: has expired, workers drop that gateway's queued jobs unrun and cancel the ones they hold.
    gateway_ttl_s: float = Field(10.0, gt=0)
    #: Gateway: at most one of its sessions moves from the busiest live worker to the idlest this
    #: often, while they differ by two or more sessions (a returning worker takes its share). 0 = never.
    session_rebalance_s: float = Field(2.0, ge=0)
    #: Deliveries of one job before it goes to the dead-letter stream.
    job_max_attempts: int = Field(3, ge=1)
    #: REST jobs one worker holds at once.
    worker_max_jobs: int = Field(4, ge=1)
    #: Live streams one worker is sized for (``ditstream worker --stream-capacity``), sent in its
    #: heartbeat: the autoscaling signal counts a worker full at this many streams, as at
    #: ``worker_max_jobs`` jobs (docs/deploy.md, "Autoscaling"). A target, not a limit: admission is
    #: the gateways' ``max_streams``.
    worker_stream_capacity: int = Field(4, ge=1)
    #: Gateway: once the oldest REST job no worker has taken has waited longer than this, the queue asks
    #: for workers (one per ``worker_max_jobs`` queued jobs, in ``ditstream_workers_wanted``); a shorter
    #: queue is a burst the live workers drain (docs/deploy.md, "Autoscaling").
    autoscale_job_wait_s: float = Field(5.0, gt=0)
    #: Encoding of stream frames between gateway and workers.
    frame_codec: Literal["raw", "jpeg", "png"] = "jpeg"
    #: ``ditstream worker``: port of its own /health and /metrics (0 = off).
    worker_health_port: int = Field(0, ge=0)

    #: Backend options (``engine.config.BackendOptions``), the ones ``build-engine`` takes, so the
    #: engines it built are the ones loaded: sizes ``WxH`` or ``N`` (``DITSTREAM_RESOLUTIONS=512,768x512``)
    #: and batch sizes (``DITSTREAM_BATCHES=1,4``) of the profile (empty = the backend's default),
    #: the engine cache folder, a TAESANA tiny VAE (file or folder) and TensorRT's opt level.
    resolutions: Annotated[list[str], NoDecode] = Field(default_factory=list)
    batches: Annotated[list[int], NoDecode] = Field(default_factory=list)
    cache_dir: str | None = None
    tiny_vae: str | None = None
    opt_level: int | None = Field(None, ge=0, le=5)
    #: LoRA adapters, ``NAME=PATH[:SCALE]`` each (``--lora``; ``DITSTREAM_LORAS`` comma-separated).
    loras: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("loras", mode="before")
    @classmethod
    def _split_loras(cls, v: object) -> object:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("loras")
    @classmethod
    def _check_loras(cls, v: list[str]) -> list[str]:
        from ditstream.engine.errors import ValidationError

        try:
            _lora_specs(v)
        except ValidationError as exc:
            raise ValueError(exc.message) from exc
        return v

    def lora_specs(self) -> tuple:  # -> tuple[engine.lora.LoraSpec, ...]
        return _lora_specs(self.loras)

    @field_validator("api_keys", "cors_origins", "webrtc_stun_servers", "webrtc_turn_urls", "outputs", "output_hosts",
                     mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        """Accept a comma-separated string as well as a JSON list (friendlier for env files)."""
        if isinstance(v, str):
            if v.strip().startswith("["):
                import json

                return json.loads(v)
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("resolutions", mode="before")
    @classmethod
    def _parse_resolutions(cls, v: object) -> object:
        """``"512,768x512"`` or a list → ``["512x512", "768x512"]``, through the one size parser."""
        from ditstream.engine.errors import ValidationError
        from ditstream.engine.sizes import parse_size

        items = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)):
            return v
        out = []
        for item in items:
            try:
                w, h = parse_size(str(item), square=True)
            except ValidationError as exc:
                raise ValueError(exc.message) from exc
            out.append(f"{w}x{h}")
        return out

    @field_validator("batches", mode="before")
    @classmethod
    def _split_batches(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("batches")
    @classmethod
    def _check_batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        return v

    @field_validator("webrtc_port_range")
    @classmethod
    def _check_port_range(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        lo, sep, hi = v.strip().partition("-")
        if not (sep and lo.strip().isdigit() and hi.strip().isdigit()
                and 1024 <= int(lo) <= int(hi) <= 65535):
            raise ValueError(f"a UDP port range 'LOW-HIGH' within 1024-65535, got {v!r}")
        return f"{int(lo)}-{int(hi)}"

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        """A plain Redis URL or ``redis+sentinel://...``, refused here with its reason (not at the first command)."""
        if v is None or not v.strip():
            return None
        from ditstream.server.scale.redis_conn import RedisTarget

        RedisTarget.parse(v.strip())
        return v.strip()

    @field_validator("webrtc_turn_urls")
    @classmethod
    def _check_turn_urls(cls, v: list[str]) -> list[str]:
        bad = [u for u in v if not u.startswith(("turn:", "turns:"))]
        if bad:
            raise ValueError(f"TURN URLs start with 'turn:' or 'turns:', got {bad}")
        return v

    @model_validator(mode="after")
    def _turn_needs_its_secret(self) -> Settings:
        if self.webrtc_turn_urls and self.webrtc_turn_secret is None:
            raise ValueError("webrtc_turn_urls needs webrtc_turn_secret (the TURN server's static-auth-secret): "
                             "clients get credentials minted from it")
        return self

    @model_validator(mode="after")
    def _check_outputs(self) -> Settings:
        """The outputs' policy and encoder, checked once here (``server/live/outputs_policy.py``):
        a bad value stops start-up naming it, never a surprise at the first ``POST``."""
        if self.outputs:
            from ditstream.engine.errors import ValidationError
            from ditstream.server.live.outputs_policy import check_settings

            try:
                check_settings(self)
            except ValidationError as exc:
                raise ValueError(exc.message) from exc
        return self

    def webrtc_ports(self) -> tuple[int, int] | None:
        """``webrtc_port_range`` as (low, high), both included; None = any port."""
        if self.webrtc_port_range is None:
            return None
        lo, _, hi = self.webrtc_port_range.partition("-")
        return int(lo), int(hi)

    @field_validator("cache_dir", "tiny_vae", "opt_level", "webrtc_public_host", "webrtc_turn_secret", "record_dir",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        """An empty value (``DITSTREAM_TINY_VAE=`` from a compose file) means unset."""
        return None if isinstance(v, str) and not v.strip() else v

    def backend_options(self) -> BackendOptions:
        """The ``BackendOptions`` these settings describe, checked (``ValidationError`` names the field)."""
        from ditstream.engine.config import BackendOptions
        from ditstream.engine.sizes import parse_size

        return BackendOptions(resolutions=tuple(parse_size(r) for r in self.resolutions),
                              batches=tuple(self.batches), cache_dir=self.cache_dir, tiny_vae=self.tiny_vae,
                              opt_level=self.opt_level).validate()

    def engine_config(self) -> EngineConfig:
        """The engine limits these settings describe: one source for the in-process engine and the
        gateway, which checks requests against the same limits before they reach a worker."""
        from ditstream.engine.config import BatchConfig, EngineConfig

        return EngineConfig(max_batch=self.max_batch, output_queue_size=self.output_queue_size,
                            max_pixels=self.max_pixels, max_prompt_chars=self.max_prompt_chars,
                            batching=BatchConfig(max_wait=self.batch_wait))

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def public(self) -> dict[str, object]:
        """Settings safe to log (keys masked)."""
        d = self.model_dump()
        d["api_keys"] = [f"***{len(self.api_keys)} key(s)"] if self.api_keys else []
        if self.redis_url:  # redis://:password@host — mask the password
            from ditstream.server.scale.redis_conn import redact

            d["redis_url"] = redact(self.redis_url)
        return d


def _lora_specs(values: list[str]) -> tuple:
    from ditstream.engine.lora import LoraSpec

    return tuple(LoraSpec.parse(v) for v in values)
