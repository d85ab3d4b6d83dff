"""The one engine factory: the engine named in the settings, in process, or the Redis gateway to the
workers' engines (``EngineClient`` either way)."""

from __future__ import annotations

from ditstream.server.engine_client import EngineClient
from ditstream.server.settings import Settings


def load_runner(settings: Settings) -> EngineClient:
    """The one factory: the engine named in the settings, in process, or the Redis gateway to the
    workers' engines when ``redis_url`` is set (blocking: called in a worker thread)."""
    from ditstream.engine.config import ModelConfig

    # The gateway holds no model: it must not import torch (seconds of start-up, hundreds of MB), so
    # the engine runner is imported only on the in-process path.
    if settings.redis_url:  # gateway mode: the engines are `ditstream worker` processes behind Redis
        from ditstream.server.scale.gateway import RedisGatewayRunner

        return RedisGatewayRunner.from_settings(settings)
    ecfg = settings.engine_config()
    if settings.model == "null":
        from ditstream.engine.null import null_runner

        return null_runner(ecfg, delay_s=settings.null_delay_s)
    from ditstream.engine.runner import EngineRunner

    mcfg = ModelConfig(model=settings.model, backend=settings.backend, device=settings.device, dtype=settings.dtype,
                       backend_options=settings.backend_options(), loras=settings.lora_specs())
    runner = EngineRunner.from_config(mcfg, ecfg)
    if settings.default_width is not None and settings.default_height is not None:
        # A backend without a size profile warms the size streams start at (a worker has no lifespan).
        runner.prefer_warmup_size(settings.default_width, settings.default_height)
    return runner
