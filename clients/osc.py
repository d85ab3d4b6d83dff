"""OSC control of a running stream (``ditstream client stream --osc-port N``, extra ``ditstream[studio]``):
messages on UDP become ``config`` changes of the stream, so a control surface (TouchDesigner, Resolume,
Ableton, TouchOSC on a phone) moves its prompt, strength, seed, LoRA scales… live.

Addresses (``docs/protocol.md``, "OSC control"):

- ``/ditstream/prompt "text"``, ``/ditstream/strength f``, ``/ditstream/seed i``, and every other config
  field the same way: ``/ditstream/<field> value`` (several values: a list, e.g. ``timesteps``);
- ``/ditstream/lora/<name> f``: one loaded adapter's scale (the others keep theirs);
- ``/ditstream/blend "text A" "text B" w``: a two-prompt blend, ``w`` the weight of B in [0, 1].

Each message is checked by the stream's own config model before anything is sent (``ConfigCheck``,
handed in by the CLI: clients import no server code); a bad one is logged once, with its address and
why, and dropped. Changes are coalesced: at most one ``config`` message between two output frames,
carrying every change made since the last (the later wins per field).

python-osc's asyncio server runs on the stream's event loop, so its handlers run there too: no locks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

PREFIX = "/ditstream"
#: Fields OSC may not change: the client's frames keep the size and mode they started with.
FIXED = frozenset({"type", "mode", "size", "width", "height"})
#: How to get python-osc, named in the error when it is missing.
STUDIO_EXTRA = "pip install 'ditstream[studio]'"


class OscError(RuntimeError):
    """The OSC port cannot be listened on."""


class ConfigCheck(Protocol):
    """The stream's config model, seen from OSC: the fields a ``config`` message has, and the check of a
    change against the stream's config so far (raises ``ValueError`` naming the field; an accepted
    change becomes part of the config the next change is checked against)."""

    fields: frozenset[str]

    def __call__(self, changes: dict[str, Any]) -> None: ...


class OscControl:
    """Turns OSC messages into config changes of one stream (``stream_client.StreamControl``)."""

    def __init__(self, host: str, port: int, make_check: Callable[[dict[str, Any]], ConfigCheck]) -> None:
        self.host, self.port = host, port
        self._make_check = make_check
        self._send: Callable[[dict[str, Any]], None] | None = None
        self._transport: asyncio.BaseTransport | None = None
        #: Changes accepted but not sent yet, and whether a config went out since the last output frame.
        self.pending: dict[str, Any] = {}
        self._sent_since_output = False
        self._loras: dict[str, float] = {}
        self._unknown: set[str] = set()

    async def start(self, ready: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
        """Listen on UDP ``host:port`` (python-osc's asyncio server, on this event loop)."""
        from pythonosc.dispatcher import Dispatcher
        from pythonosc.osc_server import AsyncIOOSCUDPServer

        self._check = self._make_check(ready)
        self._send = send
        model_loras = (ready.get("model") or {}).get("loras") or {}
        stream_loras = (ready.get("config") or {}).get("loras")  # None: every adapter at its default
        self._loras = dict(model_loras if stream_loras is None else stream_loras)
        dispatcher = Dispatcher()
        for field in sorted(self._check.fields - FIXED - {"loras"}):
            dispatcher.map(f"{PREFIX}/{field}", self._on_field, field)
        for name in model_loras:  # bound at map time: a pattern such as /ditstream/lora/* reaches each
            dispatcher.map(f"{PREFIX}/lora/{name}", self._on_lora, name)
        dispatcher.map(f"{PREFIX}/blend", self._on_blend)
        dispatcher.set_default_handler(self._on_unknown)
        server = AsyncIOOSCUDPServer((self.host, self.port), dispatcher, asyncio.get_running_loop())
        try:
            self._transport, _ = await server.create_serve_endpoint()
        except OSError as exc:  # taken since the CLI tried it: not a server failure
            raise OscError(f"cannot listen for OSC on udp {self.host}:{self.port}: {exc}") from exc
        self.port = self._transport.get_extra_info("sockname")[1]  # the one bound, for a port 0
        logger.info("OSC: listening on udp %s:%d (%s/...)", self.host, self.port, PREFIX)

    def output(self) -> None:
        """An output frame arrived: the changes that waited for it go out now (one message)."""
        self._sent_since_output = False
        if self.pending:
            self._flush()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # ------------------------------------------------------------------------------ handlers
    def _on_field(self, address: str, bound: list[str], *args: Any) -> None:
        (field,) = bound
        if not args:
            self._drop(address, args, "no value")
        else:
            self._offer(address, args, {field: args[0] if len(args) == 1 else list(args)})

    def _on_lora(self, address: str, bound: list[str], *args: Any) -> None:
        (name,) = bound
        if len(args) != 1:
            self._drop(address, args, f"expects one scale, got {len(args)} values")
        else:
            self._offer(address, args, {"loras": {**self._loras, name: args[0]}})

    def _on_blend(self, address: str, *args: Any) -> None:
        if len(args) != 3 or not all(isinstance(a, str) for a in args[:2]):
            self._drop(address, args, 'expects "text A" "text B" w')
            return
        a, b, w = args
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            self._drop(address, args, f"the weight of B must be a number in [0, 1], got {w!r}")
            return
        self._offer(address, args, {"prompt": [{"text": a, "weight": 1.0 - w}, {"text": b, "weight": float(w)}]})

    def _on_unknown(self, address: str, *args: Any) -> None:
        """Not an address of ours (or a field OSC may not change): said once per address, then ignored."""
        if address in self._unknown:
            return
        self._unknown.add(address)
        field = address[len(PREFIX) + 1 :] if address.startswith(PREFIX + "/") else None
        why = (f"{field} is fixed for the stream's life (size and mode follow the client's frames)"
               if field in FIXED else f"no such address; see {PREFIX}/<config field>, {PREFIX}/lora/<loaded "
               f"adapter: {', '.join(sorted(self._loras)) or 'none'}>, {PREFIX}/blend")
        logger.warning("OSC %s: ignored: %s", address, why)

    # ------------------------------------------------------------------------------ coalescing
    def _offer(self, address: str, args: tuple[Any, ...], changes: dict[str, Any]) -> None:
        changes = _tidy(changes)
        try:
            self._check(changes)
        except ValueError as exc:
            self._drop(address, args, str(exc))
            return
        if "loras" in changes:
            self._loras = changes["loras"]
        self.pending.update(changes)
        if not self._sent_since_output:
            self._flush()

    def _flush(self) -> None:
        assert self._send is not None
        changes, self.pending = self.pending, {}
        self._sent_since_output = True
        logger.debug("OSC: config %s", changes)
        self._send(changes)

    @staticmethod
    def _drop(address: str, args: tuple[Any, ...], why: str) -> None:
        logger.warning("OSC %s %s: dropped: %s", address, " ".join(repr(a) for a in args), why)


def _tidy(value: Any) -> Any:
    """OSC floats are 32-bit: each is taken at the shortest decimal that reads back as the same 32-bit
    float (0.4, not 0.4000000059604645), in whatever it is nested in."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    if isinstance(value, dict):
        return {k: _tidy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tidy(v) for v in value]
    return value
