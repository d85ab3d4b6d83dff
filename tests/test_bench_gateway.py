"""``ditstream bench gateway``: its arithmetic on made-up rounds, and one tiny real run end to end.

No speed is asserted: the figures are recorded in docs/benchmarks.md, not checked here. The end-to-end run
keeps one frame in flight, so what it counts is deterministic and asserted.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ditstream.bench.gateway import (
    ALL_IN_ONE,
    GATEWAY,
    GatewayBenchSpec,
    arm_order,
    format_report,
    run_gateway_bench,
    summarise,
)
from ditstream.bench.scale_harness import redis_server_binary


def _run(p50: float, p90: float, received: int, sent: int, cpu: dict[str, float]) -> dict:
    return {"g2g_ms_p50": p50, "g2g_ms_p90": p90, "g2g_ms_p99": p90 + 5, "received": received, "sent": sent,
            "cpu_s": cpu, "errors": []}


def test_summary_pairs_rounds_and_divides_cpu_by_frames():
    runs = {
        GATEWAY: [_run(5.0, 8.0, 100, 100, {"server": 0.10, "worker": 0.20, "redis": 0.05}),
                  _run(9.0, 12.0, 100, 100, {"server": 0.20, "worker": 0.20, "redis": 0.05}),
                  _run(4.0, 6.0, 100, 104, {"server": 0.00, "worker": 0.20, "redis": 0.05})],
        ALL_IN_ONE: [_run(2.0, 3.0, 100, 100, {"server": 0.30}),
                     _run(8.0, 9.0, 100, 100, {"server": 0.30}),
                     _run(3.0, 5.0, 100, 100, {"server": 0.30})],
    }
    s = summarise(runs, seconds=10.0)
    gw, aio = s["arms"][GATEWAY], s["arms"][ALL_IN_ONE]
    # per-round differences 3, 1, 1 → median 1 (the difference of the medians would be 5 − 3 = 2)
    assert s["extra_ms_p50_per_round"] == [3.0, 1.0, 1.0]
    assert s["extra_ms_p50"] == 1.0
    assert s["extra_ms_p90"] == 3.0  # 5, 3, 1
    assert gw["g2g_ms_p50"] == 5.0 and aio["g2g_ms_p50"] == 3.0
    # CPU: summed over rounds ÷ frames over rounds (0.3 s / 300 frames = 1 ms)
    assert gw["cpu_ms_per_frame"] == {"server": 1.0, "worker": 2.0, "redis": 0.5}
    assert aio["cpu_ms_per_frame"] == {"server": 3.0}
    assert s["gateway_cpu_ms_per_frame"] == 1.0
    assert gw["fps"] == 10.0 and gw["dropped_pct"] == round(100 * 4 / 304, 2)
    assert s["within_bounds"] == {"extra_p50_ms": True, "gateway_cpu_ms_per_frame": True}

    runs[GATEWAY][1]["cpu_s"]["server"] = 0.8  # 0.9 s / 300 frames = 3 ms: over the 2 ms bound
    for r in runs[GATEWAY]:
        r["g2g_ms_p50"] += 3.0
    s = summarise(runs, seconds=10.0)
    assert s["within_bounds"] == {"extra_p50_ms": False, "gateway_cpu_ms_per_frame": False}
    report = format_report(GatewayBenchSpec(rounds=3), {"summary": s})
    assert "+4.00 ms" in report and report.count("NOT met") == 2


def test_a_round_without_answers_is_left_out_of_the_medians():
    runs = {GATEWAY: [_run(float("nan"), float("nan"), 0, 10, {}), _run(4.0, 5.0, 10, 10, {})],
            ALL_IN_ONE: [_run(2.0, 3.0, 10, 10, {}), _run(2.0, 3.0, 10, 10, {})]}
    s = summarise(runs, seconds=1.0)
    assert s["arms"][GATEWAY]["g2g_ms_p50"] == 4.0 and s["extra_ms_p50"] == 2.0
    assert math.isnan(s["gateway_cpu_ms_per_frame"])  # no CPU figure: not claimed within bounds
    assert s["within_bounds"]["gateway_cpu_ms_per_frame"] is False


def test_arm_order_alternates():
    assert [arm_order(i) for i in range(3)] == [(GATEWAY, ALL_IN_ONE), (ALL_IN_ONE, GATEWAY),
                                                (GATEWAY, ALL_IN_ONE)]


@pytest.mark.timeout(120)
def test_bench_gateway_runs_both_arms_end_to_end(tmp_path: Path):
    if redis_server_binary() is None:  # the CI installs it; say so rather than pass silently
        pytest.fail("redis-server is required (apt-get install -y redis-server)", pytrace=False)
    from ditstream.clients.stream_client import encode_jpeg

    from ditstream.bench.server import pattern_images

    spec = GatewayBenchSpec(inflight=1, seconds=1.0, rounds=1, width=64, height=64, warmup_s=0.3, idle_s=0.3)
    results = run_gateway_bench(spec, log_dir=tmp_path)
    clip = [len(encode_jpeg(img, 85, "420")) for img in pattern_images(64, 64, 30)]
    for arm in (GATEWAY, ALL_IN_ONE):
        (run,) = results["runs"][arm]
        # one frame in flight: every frame sent in the window is answered, none replaced
        assert run["errors"] == [] and run["closed_loop_stalls"] == 0, run
        assert 0 < run["received"] == run["sent"] <= run["sent_incl_warmup"], run
        assert run["frame_bytes"] == round(sum(clip) / len(clip), 1)
        assert run["g2g_ms_p50"] > 0
    # one stream: the all-in-one engine ran every frame it was given, one model call each
    aio = results["runs"][ALL_IN_ONE][0]
    assert aio["batch_sizes"] == {"1": aio["sent_incl_warmup"]}, aio["batch_sizes"]
    assert set(results["runs"][GATEWAY][0]["cpu_s"]) == {"server", "worker", "redis"}
    assert set(results["runs"][ALL_IN_ONE][0]["cpu_s"]) == {"server"}
    assert set(results["idle_cpu_ms_per_s"]) == {"gateway server", "worker", "redis", "all-in-one server"}
    summary = results["summary"]
    assert set(summary["arms"]) == {GATEWAY, ALL_IN_ONE} and len(summary["extra_ms_p50_per_round"]) == 1
    report = format_report(spec, results)
    assert "gateway − all-in-one, p50" in report and "CPU ms/frame: worker" in report
    assert "with no stream" in report
