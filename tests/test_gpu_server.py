"""The server on CUDA: ``ditstream serve --device cuda`` (demo model; torch and compile backends) with
four WebSocket streams and REST requests at once: every stream's frames back, in order; the REST
images decodable and repeatable by seed; ``/metrics`` agreeing with what the clients saw.

Each case starts a real ``serve`` subprocess (``bench.harness.serve_subprocess``) and drives it with
the live-streams bench's client (``bench.live_streams.measure_level``), so it checks what a user of an
RTX card would run. Skipped with the reason on a machine without CUDA; ``DITSTREAM_GPU_TESTS_DEVICE=cpu``
runs it with ``--device cpu``; the compile case there only with ``DITSTREAM_GPU_TESTS_CPU_COMPILE=1``
too (inductor compiling the demo model for the CPU's batch buckets took over 4 minutes on the shared
2-core machine). On the GPU the server runs with ``--max-batch 4`` (buckets 1, 2, 4: three CUDA-graph
captures to warm up, which keeps the case inside gpu-check's tests step).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time

import httpx
import pytest
from gpukit import DEVICE, NEEDS_GPU
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ditstream.bench.harness import serve_subprocess
from ditstream.bench.live_streams import LiveSpec, measure_level

pytestmark = [
    pytest.mark.gpu,
    NEEDS_GPU,
]
STREAMS = 4


def _metrics(base: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(m: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


async def _streams_and_rest(base: str) -> tuple[dict, list[httpx.Response]]:
    spec = LiveSpec(fps=15.0, seconds=2.0, warmup_s=0.5, prompt="a red circle on a blue background")
    body = {"prompt": "a red circle", "n": 2, "response_format": "b64_json", "seed": 3}
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        level, *rest = await asyncio.gather(
            measure_level(base.replace("http://", "ws://") + "/v1/stream", spec, STREAMS),
            client.post("/v1/images/generations", json=body), client.post("/v1/images/generations", json=body))
    return level, rest


SLOW_ON_CPU = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("DITSTREAM_GPU_TESTS_CPU_COMPILE") != "1",
                                 reason="compiling for the CPU stand-in takes minutes: "
                                        "set DITSTREAM_GPU_TESTS_CPU_COMPILE=1")


@pytest.mark.parametrize("backend", ["torch", pytest.param("compile", marks=SLOW_ON_CPU)])
def test_serve_on_cuda_four_streams_and_rest_frames_in_order_metrics_sane(backend):
    args = ["--model", "demo", "--device", DEVICE, "--backend", backend, "--max-streams", str(STREAMS + 1),
            "--max-batch", "4", "--log-level", "warning"]
    with serve_subprocess(args, {"DITSTREAM_API_KEYS": ""}, timeout=240) as (port, _pid):
        base = f"http://127.0.0.1:{port}"
        health = httpx.get(base + "/v1/models", timeout=10)
        assert health.status_code == 200
        level, rest = asyncio.run(_streams_and_rest(base))
        assert level["errors"] == [] and level["in_order"] is True, level
        assert len(level["fps_per_stream"]) == STREAMS and all(f > 0 for f in level["fps_per_stream"]), level
        images = []
        for r in rest:
            assert r.status_code == 200, r.text[:500]
            images.append([Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]])
        assert all(len(pair) == 2 for pair in images)
        assert images[0][0].tobytes() == images[1][0].tobytes(), "the same seed gave different images"
        # /metrics agrees with the clients once every stream has closed (sessions end asynchronously).
        deadline = time.monotonic() + 10
        while (m := _metrics(base)) and _value(m, "ditstream_streams_active") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _value(m, "ditstream_streams_active") == 0
        processed = _value(m, "ditstream_frames_total", outcome="processed") + \
            _value(m, "ditstream_frames_total", outcome="skipped")
        assert processed >= level["received"] > 0  # warm-up frames count there too
        assert _value(m, "ditstream_frames_total", outcome="failed") == 0
        assert _value(m, "ditstream_model_failures_total") == 0
        assert _value(m, "ditstream_requests_total", route="/v1/images/generations", code="200") == 2
        assert _value(m, "ditstream_batch_size_count") > 0 and _value(m, "ditstream_batch_size_sum") >= processed
