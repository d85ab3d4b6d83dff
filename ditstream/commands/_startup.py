"""The start-up ``serve`` and ``worker`` share: their engine options → ``Settings`` (checked once, a bad
value is exit 2 before anything loads) → the settings logged → torch threads → the engine loaded (a
model that cannot load is one line and exit 2, not a traceback).

One place, so the two processes of a deployment read the same option the same way; each command adds
only what is its own (serve: the socket and uvicorn; worker: Redis and the health endpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from ditstream.commands._args import backend_overrides, lora_specs

if TYPE_CHECKING:
    from ditstream.server.engine_client import EngineClient
    from ditstream.server.settings import Settings


@dataclass(frozen=True)
class EngineArgs:
    """The engine options of ``serve`` and ``worker`` as given (``None``: the env var or the default)."""

    model: str | None = None
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    resolution: list[str] | None = None
    batch: list[int] | None = None
    cache_dir: str | None = None
    tiny_vae: str | None = None
    opt_level: int | None = None
    lora: list[str] | None = None
    max_batch: int | None = None
    null_delay_ms: float | None = None
    threads: int | None = None

    def overrides(self) -> dict[str, object]:
        """As ``Settings`` overrides; the backend options and ``--lora`` are checked now (usage errors)."""
        out = backend_overrides(self.resolution, self.batch, self.cache_dir, self.tiny_vae, self.opt_level)
        if self.lora:
            lora_specs(self.lora)  # a malformed --lora is a usage error before anything loads
            out["loras"] = list(self.lora)
        null_delay_s = self.null_delay_ms / 1e3 if self.null_delay_ms is not None else None
        out.update(_given(model=self.model, backend=self.backend, device=self.device, dtype=self.dtype,
                          max_batch=self.max_batch, null_delay_s=null_delay_s, threads=self.threads))
        return out


def _given(**values: object) -> dict[str, object]:
    """The values that were given (an unset option leaves the env var or the default in charge)."""
    return {k: v for k, v in values.items() if v is not None}


def settings_for(command: str, engine: EngineArgs, log: logging.Logger, **overrides: object) -> Settings:
    """``Settings`` from the environment, the engine options and the command's own ``overrides``
    (``None`` = not given), or exit 2 naming each bad value; logged once (secrets masked)."""
    settings = settings_or_exit(command, {**_given(**overrides), **engine.overrides()})
    log.info("settings: %s", settings.public())
    return settings


def load_engine_or_exit(command: str, settings: Settings) -> EngineClient:
    """The engine the settings name (the gateway to the workers when ``redis_url`` is set), loaded
    now so that a bad model or backend is one line and exit 2. A gateway holds no model: torch is
    neither imported nor configured."""
    from ditstream.engine.errors import DitstreamError
    from ditstream.server.api.factory import load_runner

    if not settings.redis_url:
        from ditstream.engine.threads import set_torch_threads

        set_torch_threads(settings.threads)
    try:
        return load_runner(settings)
    except DitstreamError as exc:
        typer.echo(f"{command}: cannot load model {settings.model!r}: {exc.message}", err=True)
        raise typer.Exit(2) from exc


def settings_or_exit(command: str, overrides: dict[str, object]) -> Settings:
    """``Settings`` from the environment and ``overrides``, or exit 2 with one line per bad value
    (an env var such as ``DITSTREAM_RESOLUTIONS=big`` included) before any model loads."""
    import pydantic

    from ditstream.engine.errors import ValidationError
    from ditstream.server.settings import Settings

    try:
        settings = Settings(**overrides)
        settings.backend_options()  # e.g. a DITSTREAM_TINY_VAE that does not exist
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            got = "" if err["type"] == "value_error" else f" (got {err.get('input')!r})"
            where = _setting(str(err["loc"][0])) if err["loc"] else "settings"  # a check across fields: no loc
            typer.echo(f"{command}: invalid {where}: "
                       f"{err['msg'].removeprefix('Value error, ')}{got}", err=True)
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        typer.echo(f"{command}: invalid {_setting(exc.field or '?')}: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    return settings


#: Settings fields whose option is named otherwise (for error messages).
_SETTING_FLAGS = {"resolutions": "--resolution", "batches": "--batch", "redis_url": "--redis",
                  "resolution": "--resolution", "batch": "--batch"}
_SETTING_ENV = {"resolution": "resolutions", "batch": "batches"}


def _setting(name: str) -> str:
    """``"resolutions"`` → ``"--resolution / DITSTREAM_RESOLUTIONS"``."""
    flag = _SETTING_FLAGS.get(name, "--" + name.replace("_", "-"))
    return f"{flag} / DITSTREAM_{_SETTING_ENV.get(name, name).upper()}"
