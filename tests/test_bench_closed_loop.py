"""``bench server`` closed loop, JPEG folders and the batch-size histogram (tiny load). Timings are not
asserted (they live in docs/benchmarks.md); what one frame in flight per stream makes deterministic is."""

from __future__ import annotations

import asyncio

import numpy as np
from ditstream.clients.stream_client import decode_jpeg, encode_jpeg
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
    # one frame in flight per stream: nothing to replace or skip, every frame counted is answered
    assert r["received"] == r["sent"] > 10 and r["dropped_pct"] == 0.0 and r["skipped_pct"] == 0.0
    assert r["inflight"] == 1 and len(r["fps_per_stream"]) == 2
    assert round(sum(r["fps_per_stream"]) * spec.seconds) == r["received"] == round(r["fps_total"] * spec.seconds)
    # the model ran every frame the server was given (warm-up included), in calls of one or two streams
    batches = {int(k): n for k, n in r["batch_sizes"].items()}
    assert set(batches) <= {1, 2} and sum(k * n for k, n in batches.items()) == r["sent_incl_warmup"], r
    # bytes per frame: the 64x64 file as it is, the 80x48 one scaled and coded at quality 85, 4:2:0
    from PIL import Image

    small = (tmp_path / "f1.jpg").read_bytes()
    scaled = np.asarray(Image.fromarray(decode_jpeg(small)).resize((64, 64), Image.BILINEAR))
    sizes = [len((tmp_path / "f0.jpg").read_bytes()), len(encode_jpeg(scaled, 85, "420"))]
    assert r["frame_bytes"] == round(sum(sizes) / 2, 1)
    assert "batch sizes" in format_report(spec, {"null engine": r})
    # the null engine's simulated call is inference, so the server's own overhead excludes it
    assert r["server_overhead_ms_p50"] < 20


def test_histogram_from_two_cumulative_scrapes():
    before = {1.0: 5, 2.0: 5, 4.0: 9, float("inf"): 9}
    after = {1.0: 6, 2.0: 6, 4.0: 30, float("inf"): 30}
    assert batch_histogram(before, after) == {"1": 1, "4": 20}
