"""What a worker can run, as its heartbeat advertises it: the backend's size profile and its LoRA
adapters (``EngineRunner.info["limits"]`` and ``["loras"]``).

The gateway checks every stream open, reconfigure and job against the profiles of the live workers
before anything is queued, so an out-of-profile size or an unknown adapter is refused at once with
the error an in-process engine raises (``BackendLimits.check_size``, ``lora.resolve_set``: the same
code, the same message), not later by a worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditstream.engine.backends.base import BackendLimits, Span
from ditstream.engine.config import StreamConfig
from ditstream.engine.lora import resolve_set
from ditstream.engine.sizes import parse_size


def _span(value: Any) -> Span | None:
    return (int(value[0]), int(value[1])) if value else None


@dataclass(frozen=True)
class WorkerProfile:
    """One worker's limits and adapters; ``loras`` is ``None`` when its heartbeat names none (an
    older worker): then only that worker can judge adapter names."""

    limits: BackendLimits
    loras: dict[str, float] | None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> WorkerProfile:
        """From a heartbeat's ``info`` (``BackendLimits.as_dict()`` under ``limits``; absent: unbounded)."""
        lim = info.get("limits") or {}
        limits = BackendLimits(max_batch=lim.get("max_batch"), min_batch=int(lim.get("min_batch") or 1),
                               width=_span(lim.get("width")), height=_span(lim.get("height")),
                               sizes=tuple(parse_size(s) for s in lim.get("sizes") or ()))
        loras = info.get("loras")
        return cls(limits, dict(loras) if loras is not None else None)

    def check(self, cfg: StreamConfig) -> None:
        """Raise the engine's ``ValidationError`` if this worker would refuse ``cfg``."""
        self.limits.check_size(cfg.width, cfg.height)
        if self.loras is not None:
            resolve_set(cfg.lora_scales, self.loras)
