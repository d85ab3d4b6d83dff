"""What ``ditstream bench server`` runs, by its options: one run (a ``--url`` and/or a null server), arms
against fresh null servers interleaved (stream counts, batch waits, repeats), or WebSocket and WebRTC side
by side. The command only parses options; this picks the runs and returns the report and the JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from ditstream.bench.server import BenchSpec

TRANSPORTS = ("ws", "webrtc", "both")


def run_server_bench(spec: BenchSpec, *, transport: str = "ws", batch_waits: list[float | None] | None = None,
                     baseline_streams: int | None = None, repeats: int = 1, url: str | None = None,
                     api_key: str | None = None, null: bool = True) -> tuple[str, dict[str, Any]]:
    """The runs the options ask for → (the printed report, the ``--json`` document). ``transport`` is one
    of ``TRANSPORTS`` (checked by the command)."""
    waits = batch_waits or [None]
    if transport != "ws":  # against fresh null servers (a --url is measured over the WebSocket only)
        from ditstream.bench.webrtc import format_transports, run_transports

        spec = dataclasses.replace(spec, batch_wait=waits[0])
        runs = run_transports(spec, ["ws", "webrtc"] if transport == "both" else ["webrtc"], repeats)
        return format_transports(spec, runs), {"spec": spec.__dict__, "runs": runs}
    if baseline_streams is None and len(waits) == 1 and repeats == 1:
        from ditstream.bench.server import run_bench
        from ditstream.bench.server_report import format_report

        spec = dataclasses.replace(spec, batch_wait=waits[0])
        results = run_bench(spec, url=url, api_key=api_key, null=null)
        return format_report(spec, results), {"spec": spec.__dict__, "results": results}
    return _run_interleaved(spec, waits, baseline_streams, repeats)


def _run_interleaved(spec: BenchSpec, waits: list[float | None], baseline_streams: int | None,
                     repeats: int) -> tuple[str, dict[str, Any]]:
    """One arm per (batch wait, stream count), each against a fresh null server, interleaved."""
    from ditstream.bench.server import run_arms
    from ditstream.bench.server_report import format_arms

    counts = [n for n in (baseline_streams, spec.streams) if n is not None]
    arms = {f"{n} stream(s)" + ("" if wait is None else f", batch_wait {wait:g}"):
            dataclasses.replace(spec, streams=n, batch_wait=wait) for wait in waits for n in counts}
    runs = run_arms(arms, repeats)
    out = {"spec": spec.__dict__, "arms": {k: v.__dict__ for k, v in arms.items()}, "runs": runs}
    return format_arms(spec, arms, runs), out
