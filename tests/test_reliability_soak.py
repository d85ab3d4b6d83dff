"""Soak, CI-sized: WebSocket connect/disconnect cycles and REST requests leave no memory behind.

The full acceptance run is ``ditstream bench soak`` (1,000 cycles and 1,000 requests; figures in
docs/reliability.md); this runs the same code on a fifth of that against a fresh null-engine server
process, so the resident memory measured is the server's alone. Bound: growth ≤ 5 % after a warm-up
(first requests fill caches, thread pools and allocator arenas that are meant to stay).

Run in both modes (``ditstream.bench.load.MODES``): the all-in-one server, and a gateway in front of
one null worker over Redis — there the memory measured is the gateway's own: its per-stream session
and per-job reply state must go when the stream or the job does.
"""

from __future__ import annotations

import pytest

from ditstream.bench.load import MODES, NullServerConfig, null_server, soak

CYCLES = 200
REQUESTS = 200


@pytest.mark.parametrize("mode", MODES)
def test_connect_disconnect_cycles_and_requests_do_not_grow_memory(mode: str) -> None:
    cfg = NullServerConfig(delay_ms=0.0, max_streams=4, max_queued_jobs=16, mode=mode)
    with null_server(cfg) as (base, pid):
        out = soak(base, pid, CYCLES, REQUESTS, cfg.width, cfg.height, warmup=50)
    assert out["ws_ok"] == CYCLES and out["ws_bad"] == 0, out
    assert out["rest_ok"] == REQUESTS and out["rest_bad"] == 0, out
    assert out["rss_growth_pct"] <= 5.0, out
