"""``ditstream bench server`` runs end to end (tiny load; the numbers themselves are not asserted)."""

from __future__ import annotations

from ditstream.clients.stream_client import encode_jpeg
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings

from ditstream.bench.harness import ServerThread
from ditstream.bench.server import BenchSpec, pattern_images, run_bench
from ditstream.bench.server_report import format_report


def test_bench_against_a_server_and_a_null_engine():
    spec = BenchSpec(streams=2, fps=15, seconds=1.5, width=64, height=64, warmup_s=0.3)
    app = create_app(Settings(model="null", api_keys=["bench-key"]), null_runner())
    with ServerThread(app) as srv:
        results = run_bench(spec, url=srv.url, api_key="bench-key", null=True)
    assert set(results) == {"server", "null engine"}
    # the clip: 30 frames of the moving pattern, JPEG quality 85, 4:2:0
    clip = [len(encode_jpeg(img, 85, "420")) for img in pattern_images(64, 64, 30)]
    for r in results.values():
        assert r["errors"] == []
        assert r["sent"] > 0 and 0 < r["received"] <= r["sent"] <= r["sent_incl_warmup"]
        assert r["dropped_pct"] == round(100 * (r["sent"] - r["received"]) / r["sent"], 2)
        assert len(r["fps_per_stream"]) == 2
        assert round(sum(r["fps_per_stream"]) * spec.seconds) == r["received"]
        # every frame answered ran through the model, and no frame ran that was not sent
        batches = {int(k): n for k, n in r["batch_sizes"].items()}
        assert set(batches) <= {1, 2}, batches
        assert r["received"] <= sum(k * n for k, n in batches.items()) <= r["sent_incl_warmup"], r
        assert r["frame_bytes"] == round(sum(clip) / len(clip), 1)
        assert r["server_loop_ticks"] > 0
        assert r["g2g_ms_p50"] > 0 and r["server_overhead_ms_p50"] > 0  # decode and encode take time
    report = format_report(spec, results)
    assert "server overhead p50 / p99 ms" in report and "null engine" in report
    assert f"{sum(clip) / len(clip):.0f}" in report.split("input JPEG bytes per frame")[1].splitlines()[0]


def test_bench_and_client_frames_are_420_like_browsers_send():
    """The bench measures the input real clients send: 4:2:0 JPEG (4:4:4 on request)."""
    import numpy as np
    import simplejpeg

    from ditstream.bench.server import _pattern

    assert simplejpeg.decode_jpeg_header(_pattern(64, 64, 1, 85)[0])[3] == "420"
    assert simplejpeg.decode_jpeg_header(_pattern(64, 64, 1, 85, "444")[0])[3] == "444"
    assert simplejpeg.decode_jpeg_header(encode_jpeg(np.zeros((32, 32, 3), np.uint8)))[3] == "420"
    assert "4:2:0" in format_report(BenchSpec(), {})
