"""The live-streams bench (``python -m ditstream.bench.live_streams``) on CPU: N = 1, 2 for a second
against the demo model through a real ``serve`` subprocess. Its JSON's shape and that every stream's
frames came back, in order; not its timings (a shared 2-core machine)."""

from __future__ import annotations

import json

from ditstream.bench.live_streams import LiveSpec, main, run

LEVEL_KEYS = {"streams", "fps_in_per_stream", "seconds", "fps_total", "fps_per_stream", "g2g_ms_p50",
              "g2g_ms_p99", "sent", "received", "dropped_pct", "in_order", "errors"}


def test_live_streams_bench_writes_one_level_per_stream_count_with_frames_in_order(tmp_path):
    out = tmp_path / "live-streams.json"
    spec = LiveSpec(levels=(1, 2), fps=15.0, seconds=1.0, warmup_s=0.5, device="cpu", backend="torch")
    report = run(spec, out)
    assert json.loads(out.read_text()) == report  # the file is the report (rewritten after each level)
    assert report["spec"]["levels"] == [1, 2] and report["spec"]["backend"] == "torch"
    assert report["gpu"] is None and report["torch"] and report["server_ready_s"] > 0
    assert [lv["streams"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert set(lv) == LEVEL_KEYS
        assert len(lv["fps_per_stream"]) == lv["streams"]
        assert all(f > 0 for f in lv["fps_per_stream"]), lv  # every stream got frames back
        assert 0 < lv["received"] <= lv["sent"] and lv["errors"] == []
        assert lv["in_order"] is True
        assert lv["g2g_ms_p50"] <= lv["g2g_ms_p99"]
        assert abs(lv["fps_total"] - lv["received"] / lv["seconds"]) < 0.01


def test_live_streams_cli_runs_a_level_and_passes_max_batch_to_serve(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["--streams", "1", "--fps", "10", "--seconds", "0.5", "--warmup-s", "0.3", "--device", "cpu",
               "--backend", "torch", "--max-batch", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert "1 streams:" in capsys.readouterr().out and report["levels"][0]["in_order"]
    assert report["spec"]["server_args"] == ["--max-batch", "2"]
