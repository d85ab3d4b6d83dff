"""``ditstream bench load`` end to end, CI-sized: over capacity the server refuses cleanly.

Open-loop load at 0.5× and 1.5× the capacity of a null-engine server (one engine tick = 100 ms,
4 streams, 4 queued images). Asserted: every answer is a 200, a 429 or a 1013 refusal — nothing
else, at either level; at 1.5× REST is refused with 429 and exactly the streams over
``max_streams`` are refused with 1013; at 0.5× no stream is refused. The latency bound (p99 of
admitted work at 1.5× within 2× of its p99 at 0.5×) is a timing figure: it is measured and
published by ``ditstream bench load`` (docs/reliability.md), not asserted on shared CI cores.

Run in both modes (``ditstream.bench.load.MODES``) with the same figures: in gateway mode admission
is the gateway's (the same app, the same permit pools) and the one null worker holds
``max_queued_jobs`` jobs at once, so capacity — and so every expected count — is unchanged.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ditstream.bench.load import MODES, NullServerConfig, format_levels, run_levels
from ditstream.cli import app


@pytest.mark.parametrize("mode", MODES)
def test_overload_is_refused_cleanly(mode: str) -> None:
    cfg = NullServerConfig(delay_ms=100.0, max_streams=4, max_queued_jobs=4, mode=mode)
    report = run_levels(cfg, [0.5, 1.5], seconds=4.0, fps=10.0)
    low, high = report["runs"]["0.5x"], report["runs"]["1.5x"]
    for r in (low, high):
        assert r["unclean"] == 0, r
        assert r["rest_sent"] == r["rest_ok"] + r["rest_429"], r
        assert r["rest_ok"] > 0 and r["frames_answered"] > 0, r
    assert low["streams_refused_1013"] == 0 and low["streams_admitted"] == 2
    assert high["streams_admitted"] == 4 and high["streams_refused_1013"] == 2
    assert high["rest_429"] > 0
    assert high["rest_throughput"] >= low["rest_throughput"]  # refusing keeps the admitted work flowing
    text = format_levels(report)
    assert "p99 of admitted work" in text and "1.5x" in text


def test_bench_commands_are_registered():
    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    assert "load" in result.output and "soak" in result.output


@pytest.mark.parametrize("command", ["load", "soak"])
def test_bench_mode_is_checked_before_anything_starts(command: str) -> None:
    result = CliRunner().invoke(app, ["bench", command, "--mode", "cluster"])
    assert result.exit_code == 2, result.output
    assert "--mode must be one of engine, gateway" in result.output
