"""Gateway hand-over (issue 29): a gateway (``ditstream serve --redis``) told to stop (SIGTERM) answers
``/ready`` 503 at once, answers the REST requests in flight, closes its WebSockets with 1012 after
``shutdown_grace_s`` — and the Python stream client resumes by itself through another gateway, its
frames in order.

Two gateway processes and one null worker on a private ``redis-server``. The client's URL is a
loopback TCP proxy standing in for the load balancer (a Kubernetes Service): it forwards new
connections to gateway A until A's ``/ready`` turns 503, then to B, as a Service drops an endpoint
that is not ready. A user gives the client that one URL; nothing in the client knows about B.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ditstream.clients.media import open_source
from ditstream.clients.stream_client import run_stream

from ditstream.bench.scale_harness import GatewayProcess, RedisServer, WorkerProcess, redis_server_binary

pytestmark = pytest.mark.timeout(120)

#: The gateways' grace before closing streams (DITSTREAM_SHUTDOWN_GRACE_S), short for the test.
GRACE_S = 0.5
N_REST = 4


class Proxy:
    """A TCP proxy on 127.0.0.1 forwarding each new connection to ``target`` (switched by the test)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    if redis_server_binary() is None:
        pytest.fail("redis-server is required (apt-get install -y redis-server)", pytrace=False)
    env = {"DITSTREAM_SHUTDOWN_GRACE_S": str(GRACE_S)}
    with RedisServer(log_dir=tmp_path) as server:
        worker = WorkerProcess(server.url, "--model", "null", "--null-delay-ms", "30", "--threads", "1",
                               worker_id="w0", log=tmp_path / "w0.log").start()
        gws = [GatewayProcess(server.url, log=tmp_path / f"gw{n}.log", env=env).start() for n in range(2)]
        try:
            for gw in gws:
                gw.wait_ready()
            yield gws[0], gws[1]
        finally:
            for gw in gws:
                gw.stop()
            worker.stop()


def _rest_request(port: int) -> socket.socket:
    """A REST job written whole to the gateway before the test goes on: in flight by construction."""
    body = json.dumps({"prompt": "p", "size": "64x64", "response_format": "b64_json"}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def _status(sock: socket.socket) -> int:
    sock.settimeout(20)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1


def test_gateway_sigterm_hands_over(fleet: tuple[GatewayProcess, GatewayProcess]):
    a, b = fleet
    asyncio.run(_hand_over(a, b))


async def _hand_over(a: GatewayProcess, b: GatewayProcess) -> None:
    import websockets

    proxy = await Proxy(a.port).start()
    outputs: list[int] = []
    client = asyncio.create_task(run_stream(
        f"ws://127.0.0.1:{proxy.port}/v1/stream", open_source("pattern", 64, 64), config={"prompt": "x", "width": 64, "height": 64},
        fps=20, seconds=4.0, on_output=lambda header, _: outputs.append(header["seq"])))
    async with websockets.connect(a.ws_url, max_size=None) as direct, httpx.AsyncClient() as http:
        assert json.loads(await direct.recv())["type"] == "ready"
        while len(outputs) < 5:  # the client streams through A
            assert not client.done(), client.result()
            await asyncio.sleep(0.02)
        rest = [_rest_request(a.port) for _ in range(N_REST)]
        assert a.proc is not None
        a.proc.terminate()
        t_term = time.monotonic()
        while (await http.get(a.url + "/ready")).status_code == 200:
            await asyncio.sleep(0.01)
        ready_after = time.monotonic() - t_term
        proxy.target = b.port  # the load balancer drops the endpoint that is not ready
        assert direct.close_code is None, "streams were closed before the grace period"
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await direct.recv()
        closed_after = time.monotonic() - t_term
    statuses = await asyncio.gather(*(asyncio.to_thread(_status, s) for s in rest))
    stats = await client
    proxy.close()
    print(f"\n  /ready 503 after {ready_after * 1e3:.0f} ms; streams closed {direct.close_code} after "
          f"{closed_after:.2f} s; REST {statuses}; client: {stats.summary()}, reconnects {stats.reconnects} "
          f"{stats.close_codes}")
    assert ready_after < 0.5
    assert (direct.close_code, direct.close_reason) == (1012, "server restarting")
    assert closed_after >= GRACE_S
    assert statuses == [200] * N_REST
    # uvicorn raises the signal it caught again once shut down: death by SIGTERM, not a SIGKILL after a timeout
    assert a.proc.wait(20) == -signal.SIGTERM
    assert stats.close_codes == [1012] and stats.reconnects == 1
    assert outputs == sorted(set(outputs)), "frames repeated or out of order"
    resumed = [s for s in outputs if s > stats.sent // 2]
    assert len(resumed) >= 5, f"the stream did not go on through gateway B: {outputs}"
    assert stats.received == len(outputs) and not stats.errors
