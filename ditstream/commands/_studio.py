"""The studio side of ``ditstream client stream``: the check of OSC changes (``--osc-port``) and the
opening of the OSC control, with the usage errors of the studio extras.

The check lives here, not in ``clients/``: clients speak the wire protocol only and import no server
code, while the CLI may. So an OSC value is checked by the very code the server runs on a ``config``
message (``parse_control`` → ``ConfigMessage``, then ``StreamConfig.validate`` under the limits the
``ready`` message states, then the LoRA names), before anything is sent.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import typer

from ditstream.commands.client import EXIT_USAGE


class StreamConfigCheck:
    """``clients.osc.ConfigCheck`` with the server's config model, from a stream's ``ready`` message."""

    def __init__(self, ready: dict[str, Any]) -> None:
        from ditstream.engine.config import StreamConfig
        from ditstream.server.live.protocol import ConfigMessage

        self.fields = frozenset(ConfigMessage.model_fields) - {"type"}
        shown = {k: v for k, v in (ready.get("config") or {}).items() if k in self.fields and k != "size"}
        self.current = StreamConfig().replace(**ConfigMessage.model_validate(shown).engine_changes())
        limits = ready.get("limits") or {}
        self.max_fps: float | None = limits.get("max_fps")
        self.bounds = {"max_prompt_chars": limits.get("max_prompt_chars", 2000),
                       "max_pixels": limits.get("max_pixels", 1024 * 1024),
                       # the size is the one the server accepted, and OSC cannot change it
                       "size_multiple": limits.get("size_multiple") or 1}
        self.loras = dict.fromkeys((ready.get("model") or {}).get("loras") or {}, 1.0)

    def __call__(self, changes: dict[str, Any]) -> None:
        """Raise ``ValueError`` (the server's message, naming the field) unless the server would accept
        ``changes`` on top of the changes accepted so far; else remember them."""
        from ditstream.engine.errors import DitstreamError, ValidationError
        from ditstream.engine.lora import resolve_set
        from ditstream.server.live.protocol import parse_control

        try:
            try:
                text = json.dumps({"type": "config", **changes}, allow_nan=False)
            except (TypeError, ValueError) as exc:  # an OSC blob, or NaN/inf
                raise ValidationError(f"not a JSON value: {exc}", field="config") from exc
            msg = parse_control(text)
            # the server's one check outside the config model (server.live.session.wanted_config)
            if msg.fps is not None and self.max_fps is not None and msg.fps > self.max_fps:
                raise ValidationError(f"fps is {msg.fps}; the limit is {self.max_fps}", field="fps")
            try:
                cfg = self.current.replace(**msg.engine_changes())
            except TypeError as exc:
                raise ValidationError(f"bad config: {exc}", field="config") from exc
            cfg.validate(**self.bounds)
            resolve_set(cfg.lora_scales, self.loras)
        except DitstreamError as exc:
            raise ValueError(exc.message) from exc
        self.current = cfg


def osc_control(port: int | None, host: str) -> Any:  # -> clients.osc.OscControl | None
    """The OSC control of ``--osc-port`` (None without it), or exit 2 without python-osc."""
    if port is None:
        return None
    if not 0 < port < 65536:
        raise typer.BadParameter(f"must be a UDP port in 1-65535, got {port}", param_hint="--osc-port")
    from ditstream.clients.osc import STUDIO_EXTRA, OscControl

    try:
        import pythonosc  # noqa: F401
    except ImportError as exc:
        typer.echo(f"ditstream client stream: --osc-port needs python-osc: {STUDIO_EXTRA}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    try:  # a port in use is a usage error before the stream opens, not a failure in the middle of it
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        typer.echo(f"ditstream client stream: cannot listen for OSC on udp {host}:{port}: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    return OscControl(host, port, StreamConfigCheck)
