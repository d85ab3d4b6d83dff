"""WebSocket fuzzing against a real server process: it never crashes, other streams are unaffected,
memory stays bounded.

The server is ``ditstream serve --model null`` in a subprocess, so a crash is a dead process, and its
resident memory is its own. Every test runs twice (``ditstream.bench.load.MODES``): against that
all-in-one server ("engine") and against a gateway (``ditstream serve --redis URL``) in front of one
``ditstream worker --model null`` ("gateway"), where the memory measured is the gateway's and every
frame the witness gets back has crossed Redis twice. A *witness* stream sends frames in lock-step through every phase and
must get each one back, in order, unchanged (the null engine echoes). The phases:

* seeded random hostile messages: garbage bytes, lying frame headers, decompression bombs (a valid
  30000×30000 PNG, a 60000×60000 JPEG header) and images with bombs for headers,
  wrong sizes, corrupt bodies, non-JSON, deep JSON, configs and pings with hostile values (NaN,
  Infinity, 10^30, unknown fields, wrong types) — answered with an in-band error or a close code,
  never 1011 (a handler that crashed);
* fragmented messages (reassembled and answered; over the limit once assembled: 1009);
* oversized messages: over the app's frame and control limits (1009), over the transport limit (1009);
* raw protocol violations on a bare socket: unmasked frames, reserved opcodes and RSV bits, oversized
  and fragmented control frames, a continuation with no start, invalid UTF-8, a 2^63-byte length,
  half a frame then a hang-up;
* clients that never read while they send as fast as they can: the server keeps reading, drops
  their outputs, and its memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from testkit import decode_output, frame_message, jpeg, jpeg_bomb, png_bomb

from ditstream.bench.load import MODES, NullServerConfig, null_server, rss_bytes

SIZE = 64
MAX_FRAME = 256 * 1024
MAX_CONTROL = 16 * 1024
#: Close codes a hostile client may get: protocol error, unsupported data, invalid payload, policy,
#: too big (RFC 6455). 1011 means a handler crashed; 1006 means no close frame at all.
ALLOWED_CLOSES = {1000, 1002, 1003, 1007, 1008, 1009}


@pytest.fixture(scope="module", params=MODES)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """One server process per mode for the whole module: (base URL, pid of the process serving HTTP)."""
    cfg = NullServerConfig(delay_ms=5.0, max_streams=16, max_queued_jobs=8, width=SIZE, height=SIZE,
                           extra_env=(("DITSTREAM_MAX_FRAME_BYTES", str(MAX_FRAME)),
                                      ("DITSTREAM_MAX_CONTROL_BYTES", str(MAX_CONTROL)),
                                      ("DITSTREAM_MAX_CONSECUTIVE_ERRORS", "20")), mode=request.param)
    with null_server(cfg) as (base, pid):
        yield base, pid


def _ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/stream"


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size // 4, size // 4, 1), np.uint8))


# ------------------------------------------------------------------------------------ the witness
class Witness:
    """A well-behaved stream in a thread of its own: lock-step frames, each checked on return."""

    def __init__(self, base: str) -> None:
        self.url = _ws_url(base)
        self.stop = threading.Event()
        self.answered = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        try:
            async with websockets.connect(self.url, max_size=None) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                seq = 0
                while not self.stop.is_set():
                    img = _image(seq % 7)
                    await ws.send(frame_message(jpeg(img, 95), seq, float(seq)))
                    while True:
                        msg = await asyncio.wait_for(ws.recv(), 20)
                        if isinstance(msg, bytes):
                            break
                        self.failures.append(f"unexpected text {msg[:200]}")
                    header, out = decode_output(msg)
                    if header["seq"] != seq or header["ts"] != float(seq):
                        self.failures.append(f"frame {seq} answered as {header}")
                    if float(np.abs(out.astype(np.float32) - img).mean()) > 6.0:
                        self.failures.append(f"frame {seq} came back changed")
                    self.answered += 1
                    seq += 1
                    await asyncio.sleep(0.02)
        except Exception as exc:
            self.failures.append(f"witness died: {exc!r}")

    def __enter__(self) -> Witness:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _stream_closes(base: str) -> dict[str, float]:
    """Server-side count of ``/v1/stream`` endings by close code (``ditstream_requests_total``)."""
    out: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("ditstream_requests_total{") and 'route="/v1/stream"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            out[code] = float(line.rsplit(" ", 1)[1])
    return out


def _state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``/proc/<pid>/stat``), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs: not gone, and not a zombie (a dead child nobody reaped yet, which
    ``kill(pid, 0)`` would still find)."""
    return _state(pid) not in (None, "Z", "X")


def _ended_since(base: str, before: dict[str, float]) -> dict[str, float]:
    """The ``/v1/stream`` sockets the server counted as ended since ``before``, by close code."""
    after = _stream_closes(base)
    return {code: after[code] - before.get(code, 0.0) for code in after if after[code] > before.get(code, 0.0)}


def _healthy(base: str, pid: int) -> None:
    """The process lives, answers, and every fuzz stream has been cleaned up."""
    assert _alive(pid), f"the server process {pid} died"
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    assert httpx.get(base + "/ready", timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(base + "/metrics", timeout=10).text
        if "ditstream_streams_active 0.0" in metrics:
            return
        time.sleep(0.1)
    raise AssertionError("streams were not cleaned up: " + next(ln for ln in metrics.splitlines()
                                                                if ln.startswith("ditstream_streams_active")))


# ------------------------------------------------------------------------------------ hostile messages
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width``×``height`` (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


#: Real decompression bombs (valid files Pillow itself refuses as bombs), unlike the header-only PNG
#: above, which Pillow cannot even identify.
BOMBS = (png_bomb(30000, 30000), jpeg_bomb(60000, 60000))

HOSTILE_VALUES: list[Any] = [None, True, -1, 0, 2**70, -(2**70), 1e308, -1e308, 1.5, "", "x" * 3000, "\u0000\ud7ff",
                             [], {}, [1, 2, 3], {"a": {"b": None}}, "512x512", "99999x99999", "0x0", "-32x-32"]
NUMERIC_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "1" * 400]
CONFIG_FIELDS = ["prompt", "mode", "steps", "strength", "seed", "size", "width", "height", "guidance_scale",
                 "timesteps", "filter", "fps", "quality", "bogus", "type", "prompt_interpolation", "transition_frames",
                 "feedback"]


def hostile_messages(rng: random.Random, good: bytes) -> Iterator[str | bytes]:
    """Endless seeded stream of bad (and a few good) messages."""
    while True:
        kind = rng.randrange(14)
        if kind == 0:
            yield rng.randbytes(rng.choice([0, 1, 3, 4, 5, 64, 5000]))
        elif kind == 1:
            magic = rng.choice([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP"])
            yield magic + rng.randbytes(rng.randrange(0, 3000))
        elif kind == 2:  # a frame header that lies about its length or is not an object
            n = rng.choice([0, 1, 4096, 4097, 2**31, 2**32 - 1, 10])
            head = rng.choice([b"{}", b"[]", b"null", b"{\"seq\":", b"{" * 50, b'{"a":' + b"[" * 4000,
                               json.dumps({"seq": 1}).encode()])
            yield struct.pack(">I", n) + head + rng.randbytes(rng.randrange(0, 100))
        elif kind == 3:  # a well-formed header with hostile values
            head = {"seq": rng.choice(HOSTILE_VALUES), "ts": rng.choice(HOSTILE_VALUES)}
            data = json.dumps(head).encode()
            yield struct.pack(">I", len(data)) + data + rng.choice([good, rng.randbytes(50)])
        elif kind == 4:  # images that are not what the stream expects
            yield rng.choice([jpeg(_image(1, 32)), jpeg(_image(2, 128)), good[: len(good) // 2],
                              _png_header_only(100_000, 100_000), _png_header_only(0, 0),
                              _png_header_only(SIZE, SIZE), *BOMBS])
        elif kind == 5:
            yield rng.choice(["", " ", "{", "}", "[", "null", "42", "[" * 3000, '"config"', "\ud800".encode("utf-8", "surrogatepass")
                              .decode("utf-8", "replace"), "[" * 5000 + "]" * 5000, "{\"a\":" * 3000 + "1" + "}" * 3000])
        elif kind in (6, 7, 8):  # configs with hostile values, sometimes as raw JSON tokens
            fields = rng.sample(CONFIG_FIELDS, rng.randrange(1, 4))
            if rng.random() < 0.3:
                body = ",".join(f'"{f}":{rng.choice(NUMERIC_TOKENS)}' for f in fields)
                yield '{"type":"config",' + body + "}"
            else:
                msg: dict[str, Any] = {"type": "config"}
                for f in fields:
                    msg[f] = rng.choice([*HOSTILE_VALUES, {"enabled": True, "threshold": 2}, [0.1] * 9, "txt2img"])
                yield json.dumps(msg)
        elif kind == 9:
            yield json.dumps({"type": "ping", "ts": rng.choice(HOSTILE_VALUES)})
        elif kind == 10:
            yield json.dumps({"type": rng.choice([None, 5, "Config", "frame", "ready", "x" * 500, ["config"]])})
        elif kind == 11:
            yield '{"type":"ping","ts":' + rng.choice(NUMERIC_TOKENS) + "}"
        else:  # now and then something good, so the error counter resets and the stream lives on
            yield rng.choice([good, frame_message(good, rng.randrange(0, 2**31)), '{"type":"ping","ts":1}'])


async def _fuzz_client(url: str, seed: int, budget: int, good: bytes) -> tuple[list[tuple[int | None, bool]], int]:
    """Send ``budget`` hostile messages, reconnecting whenever the server closes; for each connection
    the close code received and whether the server ended it (else the client did, its budget spent)."""
    rng = random.Random(seed)
    messages = hostile_messages(rng, good)
    closes: list[tuple[int | None, bool]] = []
    sent = 0
    while sent < budget:
        async with websockets.connect(url, max_size=None, max_queue=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"

            async def drain(ws: websockets.ClientConnection = ws) -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    async for _ in ws:
                        pass

            reader = asyncio.create_task(drain())
            try:
                while sent < budget:
                    await ws.send(next(messages))
                    sent += 1
                    if sent % 25 == 0:
                        await asyncio.sleep(0.01)
            except websockets.ConnectionClosed:
                pass
            by_server = ws.close_code is not None
            await asyncio.wait_for(reader, 30) if by_server else reader.cancel()
        closes.append((ws.close_code, by_server))
    return closes, sent


def test_hostile_messages_never_crash_and_other_streams_are_unaffected(server):
    base, pid = server
    good = jpeg(_image(3), 90)
    before = _stream_closes(base)
    with Witness(base) as witness:
        async def main() -> list[tuple[list[tuple[int | None, bool]], int]]:
            return await asyncio.gather(*[_fuzz_client(_ws_url(base), seed, 400, good) for seed in range(4)])

        results = asyncio.run(main())
        during = witness.answered
        deadline = time.monotonic() + 10
        while witness.answered <= 10 and not witness.failures and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the witness: it must go on being answered after the fuzz too
    assert witness.failures == []
    assert during > 0 and witness.answered > 10, (during, witness.answered)
    assert sum(n for _, n in results) == 1600
    by_server = [code for cl, _ in results for code, server_ended in cl if server_ended]
    by_client = [code for cl, _ in results for code, server_ended in cl if not server_ended]
    assert by_server, "the server ended no fuzz connection: the fuzz proves nothing"
    # A connection the server ended carries a deliberate code: not none, not a plain 1000. Clients
    # may see 1006 instead: a server that closes while a client keeps sending resets the TCP
    # connection (unread bytes), and the reset discards the close frame on its way.
    assert set(by_server) <= (ALLOWED_CLOSES - {1000}) | {1006}, by_server
    assert set(by_client) <= ALLOWED_CLOSES | {1006}, by_client
    # So the server's own count of how it ended each socket judges those 1006s, once it has counted
    # every one (each fuzz connection and the witness's). "1000" is also how it counts a socket
    # dropped without a close of its own (a handler that died): only the sockets the clients ended
    # themselves (and the witness's) may end that way; every other needs a deliberate code.
    sockets = len(by_server) + len(by_client) + 1
    deadline = time.monotonic() + 10
    while sum((ended := _ended_since(base, before)).values()) < sockets and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the server's count, bounded by the deadline
    assert sum(ended.values()) == sockets, f"{ended}: {sockets} sockets ended"
    assert set(ended) <= {str(c) for c in ALLOWED_CLOSES}, ended
    assert ended.get("1000", 0) <= len(by_client) + 1, f"{ended}: sockets ended without a deliberate close code"
    _healthy(base, pid)


# ------------------------------------------------------------------------------------ fragments, sizes
def test_fragmented_and_oversized_messages(server):
    base, pid = server
    url = _ws_url(base)

    async def main() -> None:
        img = _image(5)
        data = frame_message(jpeg(img, 95), 7, 7.0)
        async with websockets.connect(url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send([data[:5], data[5:100], data[100:]])  # one binary message in three frames
            header, out = decode_output(await asyncio.wait_for(ws.recv(), 20))
            assert header["seq"] == 7 and float(np.abs(out.astype(np.float32) - img).mean()) < 6
            await ws.send(['{"type":"pi', 'ng","ts":', "5}"])  # a fragmented text message
            assert json.loads(await asyncio.wait_for(ws.recv(), 20))["ts"] == 5
            # over the app limit once assembled (under the transport's limit of MAX_FRAME + 64 KiB)
            await ws.send([b"\xff\xd8\xff" + bytes(MAX_FRAME // 3 + 8192)] * 3)
            assert json.loads(await asyncio.wait_for(ws.recv(), 20))["code"] == "payload_too_large"
            await asyncio.wait_for(ws.wait_closed(), 20)
            assert ws.close_code == 1009
        for message in ('{"type":"config","prompt":"' + "p" * MAX_CONTROL + '"}',  # app control limit
                        b"\xff\xd8\xff" + bytes(MAX_FRAME + 128 * 1024)):  # over the transport limit
            async with websockets.connect(url, max_size=None) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(message)
                await asyncio.wait_for(ws.wait_closed(), 20)
                assert ws.close_code == 1009

    with Witness(base) as witness:
        asyncio.run(main())
    assert witness.failures == [] and witness.answered > 0
    _healthy(base, pid)


# ------------------------------------------------------------------------------------ raw protocol abuse
def _raw_connect(base: str) -> tuple[socket.socket, bytes]:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/stream HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "handshake refused"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    return sock, rest


def _ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0,
              length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if n < 126:
        head = struct.pack(">BB", first, (0x80 if mask else 0) | n)
    elif n < 2**16:
        head = struct.pack(">BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack(">BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _close_code(sock: socket.socket, buf: bytes, timeout: float = 10.0) -> int | None:
    """Read server frames until its close frame; its code (None: connection ended without one)."""
    sock.settimeout(timeout)
    while True:
        while len(buf) >= 2:
            b1, b2 = buf[0], buf[1] & 0x7F
            off = 2
            if b2 == 126:
                if len(buf) < 4:
                    break
                b2, off = struct.unpack_from(">H", buf, 2)[0], 4
            elif b2 == 127:
                if len(buf) < 10:
                    break
                b2, off = struct.unpack_from(">Q", buf, 2)[0], 10
            if len(buf) < off + b2:
                break
            payload, buf = buf[off : off + b2], buf[off + b2 :]
            if b1 & 0x0F == 8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return None
        if not chunk:
            return None
        buf += chunk


def _assert_closed_cleanly(name: str, code: int | None) -> None:
    """A violation is answered with a close frame carrying a deliberate code: a connection that just
    ends (``None``) or a 1011 (a handler that crashed) is not a clean close."""
    assert code in ALLOWED_CLOSES, f"{name}: close {code} (None: the connection ended without a close frame)"


RAW_ABUSE = {
    "unmasked frame": [_ws_frame(2, b"\xff\xd8\xff", mask=False)],
    "reserved opcode": [_ws_frame(3, b"x")],
    "reserved control opcode": [_ws_frame(0xB, b"x")],
    "rsv bits": [_ws_frame(2, b"x", rsv=0b111)],
    "ping over 125 bytes": [_ws_frame(9, bytes(200))],
    "fragmented ping": [_ws_frame(9, b"x", fin=False)],
    "continuation with no start": [_ws_frame(0, b"x")],
    "new message inside a fragmented one": [_ws_frame(2, b"ab", fin=False), _ws_frame(2, b"cd")],
    "invalid utf-8 text": [_ws_frame(1, b"\xff\xfe{\"type\":\"ping\"}")],
    "2^63 length": [_ws_frame(2, b"", length=2**63 - 1)],
    "close with a bad code": [_ws_frame(8, struct.pack(">H", 999))],
}


@pytest.mark.parametrize("name", list(RAW_ABUSE))
def test_raw_protocol_violations_close_cleanly(server, name):
    base, pid = server
    sock, buf = _raw_connect(base)
    with sock:
        for frame in RAW_ABUSE[name]:
            sock.sendall(frame)
        code = _close_code(sock, buf)
    _assert_closed_cleanly(name, code)
    assert _alive(pid), f"{name}: the server process died"
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_half_frames_and_hangups_leave_nothing_behind(server):
    base, pid = server
    for cut in (1, 2, 5, 40):
        sock, _ = _raw_connect(base)
        frame = _ws_frame(2, jpeg(_image(1), 90))
        sock.sendall(frame[:cut])
        sock.close()
    sock, _ = _raw_connect(base)  # a silent client: connects, never sends, then resets
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    _healthy(base, pid)


# ------------------------------------------------------------------------------------ never-readers
#: What the never-readers push together at least (and for at least ``NEVER_READ_S``): a server that
#: kept what they send would grow by that much, four times the bound on its growth.
NEVER_READ_MB, NEVER_READ_S = 64, 4.0


class Pushed:
    """Bytes the never-readers have sent, summed across their threads."""

    def __init__(self) -> None:
        self.bytes = 0
        self.reconnects = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n


def _never_read(base: str, frames: list[bytes], done: threading.Event, pushed: Pushed) -> None:
    """Handshake, then only send frames (and pings that want answers) — never read a byte; when the
    server closes the socket (it may, for a client that never reads its replies), connect again."""
    i = 0
    while not done.is_set():
        try:
            sock, _ = _raw_connect(base)
        except (OSError, AssertionError):  # refused while the server still holds our last socket
            done.wait(0.05)
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(2.0)
        try:
            while not done.is_set():
                sock.sendall(frames[i % len(frames)])
                pushed.add(len(frames[i % len(frames)]))
                if i % 10 == 0:
                    sock.sendall(_ws_frame(1, b'{"type":"ping","ts":1}'))
                i += 1
        except OSError:
            pushed.reconnects += 1
        finally:
            sock.close()


def test_clients_that_never_read_cost_bounded_memory(server):
    """Four clients send as fast as they can and never read: the server keeps reading, drops their
    outputs, and grows by a fraction of what they pushed, not by what they pushed."""
    base, pid = server
    cfg_frames = []
    for k in range(4):
        noise = np.random.default_rng(k).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        cfg_frames.append(_ws_frame(2, frame_message(jpeg(noise, 95), k)))
    rss0 = rss_bytes(pid)
    peak = rss0
    pushed, done = Pushed(), threading.Event()
    with Witness(base) as witness:
        threads = [threading.Thread(target=_never_read, args=(base, cfg_frames, done, pushed), daemon=True)
                   for _ in range(4)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_bytes(pid))
            elapsed = time.monotonic() - t0
            if (elapsed >= NEVER_READ_S and pushed.bytes >= NEVER_READ_MB * 2**20) or elapsed > 60:
                done.set()
            time.sleep(0.05)  # the sampling period of the server's RSS
        for t in threads:
            t.join(10)
    pushed_mb = pushed.bytes / 2**20
    growth_mb = (peak - rss0) / 2**20
    print(f"\nnever-readers: pushed {pushed_mb:.1f} MB in {time.monotonic() - t0:.1f} s "
          f"({pushed.reconnects} reconnects), server RSS +{growth_mb:.1f} MB")
    assert witness.failures == [] and witness.answered > 0
    assert pushed_mb >= NEVER_READ_MB, f"the never-readers pushed only {pushed_mb:.1f} MB: test too weak"
    # Bounded: the server's queues hold a few frames per stream, whatever the clients push; a server
    # that kept even a quarter of it fails.
    assert growth_mb < pushed_mb / 4, f"server RSS grew {growth_mb:.1f} MB while never-readers pushed {pushed_mb:.1f} MB"
    _healthy(base, pid)


def test_nan_and_infinity_are_not_accepted_as_settings(server):
    """JSON's NaN/Infinity tokens parse in Python: they must be refused, not applied."""
    base, _ = server

    async def main() -> list[dict[str, Any]]:
        replies = []
        async with websockets.connect(_ws_url(base), max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            for body in ('"strength":NaN', '"guidance_scale":Infinity', '"fps":NaN', '"timesteps":[NaN]',
                         '"filter":{"threshold":NaN}', '"guidance_scale":-Infinity'):
                await ws.send('{"type":"config",' + body + "}")
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        return replies

    for reply in asyncio.run(main()):
        assert reply["type"] == "error", reply
        applied = reply.get("applied") or {}
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in applied.values())


# ------------------------------------------------------------------------------------ the judges themselves
def test_the_judges_see_a_dead_process_and_a_missing_close_code():
    """A child that exited (reaped or still a zombie) is dead; a connection that ends without a
    close frame has no close code, and that is not a clean close."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert _alive(os.getpid())
    deadline = time.monotonic() + 20
    while _state(child.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)  # until it has exited, unreaped: a zombie
    assert _state(child.pid) == "Z"
    assert not _alive(child.pid)
    child.wait()
    assert not _alive(child.pid)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
        peer.sendall(_ws_frame(2, b"half", mask=False)[:3])
        peer.close()  # hangs up: half a frame and no close frame
        with client:
            code = _close_code(client, b"", timeout=5)
    assert code is None
    with pytest.raises(AssertionError, match="without a close frame"):
        _assert_closed_cleanly("hang-up", code)
    _assert_closed_cleanly("clean", 1002)
