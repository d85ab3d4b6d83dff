"""``bench server`` closed loop, JPEG folders and the batch-size histogram (tiny load; figures not asserted)."""

from __future__ import annotations

import asyncio

import numpy as np
from ditstream.clients.stream_client import encode_jpeg
from ditstream.engine.config import EngineConfig
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings

from ditstream.bench.harness import ServerThread
from ditstream.bench.server import BenchSpec, _folder_frames, measure
from ditstream.bench.server_report import batch_histogram, format_report


def test_closed_loop_keeps_n_in_flight_and_reports_batches_and_spread(tmp_path):
    for i, size in enumerate([(64, 64), (80, 48)]):  # a frame of another size is scaled, as clients do
        (tmp_path / f"f{i}.jpg").write_bytes(encode_jpeg(np.full((size[1], size[0], 3), 40 * i, np.uint8)))
    (tmp_path / "notes.txt").write_text("ignored")
    frames = _folder_frames(str(tmp_path), 64, 64, 85, "420")
    assert len(frames) == 2

    spec = BenchSpec(streams=2, seconds=1.5, width=64, height=64, warmup_s=0.3, inflight=1, frames_dir=str(tmp_path))
    app = create_app(Settings(model="null", api_keys=[]), null_runner(EngineConfig(), delay_s=0.02))
    with ServerThread(app) as srv:
        r = asyncio.run(measure(srv.url, spec))
    assert r["errors"] == [] and r["closed_loop_stalls"] == 0
    assert r["received"] > 10 and r["dropped_pct"] == 0.0  # one frame in flight: nothing to replace
    assert r["inflight"] == 1 and len(r["fps_per_stream"]) == 2 and r["fps_spread_pct"] >= 0
    assert r["batch_sizes"] and set(r["batch_sizes"]) <= {"1", "2"}
    assert "batch sizes" in format_report(spec, {"null engine": r})
    # the null engine's simulated call is inference, so the server's own overhead excludes it
    assert r["server_overhead_ms_p50"] < 20


def test_histogram_from_two_cumulative_scrapes():
    before = {1.0: 5, 2.0: 5, 4.0: 9, float("inf"): 9}
    after = {1.0: 6, 2.0: 6, 4.0: 30, float("inf"): 30}
    assert batch_histogram(before, after) == {"1": 1, "4": 20}
