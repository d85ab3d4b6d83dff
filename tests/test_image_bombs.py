"""Decompression bombs and decoder exceptions: an image whose header claims more pixels than the
limit is refused from its header (REST 413, WebSocket in-band ``invalid_image``, the stream goes on),
and whatever a decoder raises becomes ``invalid_image`` — never a 500, a dropped keep-alive
connection or a 1011. Checked on the one decode helper, on the all-in-one server, and through a
gateway with a real ``redis-server`` and an in-process worker.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import uuid
import warnings
import zlib

import httpx
import numpy as np
import pytest
import redis
import simplejpeg
import websockets
from ditstream.engine import imagefile
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.errors import ImageDecodeError, ImageTooLargeError
from ditstream.engine.imagefile import decode
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.errors import mapping_for
from ditstream.server.scale.messages import ImageMeta, JobMessage, JobResult, config_to_wire, decode_image
from ditstream.server.settings import Settings
from PIL import Image, UnidentifiedImageError
from testkit import frame_message, jpeg, jpeg_bomb, png_bomb, recv_frame, recv_json

from ditstream.bench.harness import ServerThread

pytestmark = pytest.mark.timeout(180)

KEY = "k-" + "b" * 30
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZE = 64
MAX_PIXELS = 128 * 128

PNG_BOMB = png_bomb(30000, 30000)
JPEG_BOMB = jpeg_bomb(60000, 60000)
BOMBS = [("bomb.png", PNG_BOMB), ("bomb.jpg", JPEG_BOMB)]


def _img() -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x * 4, y * 4, np.full_like(x, 90)], -1).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = _png(_img())
GOOD_JPEG = jpeg(_img())


# ------------------------------------------------------------------------------------ the fixtures are bombs
def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, off = [], 8
    while off < len(data):
        (n,) = struct.unpack_from(">I", data, off)
        kind, body = data[off + 4 : off + 8], data[off + 8 : off + 8 + n]
        (crc,) = struct.unpack_from(">I", data, off + 8 + n)
        assert crc == zlib.crc32(kind + body), f"bad CRC on {kind!r}"
        out.append((kind, body))
        off += 12 + n
    return out


def test_the_fixtures_are_real_decompression_bombs():
    assert len(PNG_BOMB) < 200_000 and len(JPEG_BOMB) < 2_000
    for data in (PNG_BOMB, JPEG_BOMB):
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(data))  # Pillow itself calls it a bomb
    # A valid PNG: every CRC right, and the IDAT inflates to exactly the rows the header declares.
    chunks = _png_chunks(PNG_BOMB)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (w, h, depth, colour) == (30000, 30000, 1, 0)
    z, inflated, rest = zlib.decompressobj(), 0, chunks[1][1]
    while rest:
        inflated += len(z.decompress(rest, 1 << 24))
        rest = z.unconsumed_tail
    inflated += len(z.flush())
    assert z.eof and inflated == h * (1 + (w + 7) // 8)
    assert simplejpeg.decode_jpeg_header(JPEG_BOMB)[:2] == (60000, 60000)


# ------------------------------------------------------------------------------------ the decode helper
@pytest.mark.parametrize("data", [PNG_BOMB, JPEG_BOMB], ids=["png", "jpeg"])
def test_bomb_is_refused_from_its_header(data):
    with pytest.raises(ImageTooLargeError) as info:
        decode(data, max_pixels=MAX_PIXELS)
    assert info.value.error_type == "invalid_image" and info.value.field == "image"
    row = mapping_for(info.value)
    assert (row.http_status, row.ws_close) == (413, None)


@pytest.mark.parametrize("warnings_filter", ["error", "ignore", "default"])
def test_the_answer_does_not_depend_on_the_warnings_filter(warnings_filter):
    between = png_bomb(10000, 10000)  # over Pillow's warning limit (89 M pixels), under its error limit
    with warnings.catch_warnings():
        warnings.simplefilter(warnings_filter)
        with pytest.raises(ImageTooLargeError):
            decode(between, max_pixels=MAX_PIXELS)
        with pytest.raises(ImageTooLargeError):  # a limit above Pillow's: Pillow's applies, in every mode
            decode(between, max_pixels=10**9)


def _truncated_idat() -> bytes:
    chunks = _png_chunks(GOOD_PNG)
    idat = next(body for kind, body in chunks if kind == b"IDAT")
    cut = idat[: len(idat) // 2]
    chunk = b"IDAT" + cut
    return GOOD_PNG[:33] + struct.pack(">I", len(cut)) + chunk + struct.pack(">I", zlib.crc32(chunk))


CORRUPT = {
    "png cut in the header": GOOD_PNG[:20],
    "png cut in the data": GOOD_PNG[: len(GOOD_PNG) // 2],
    "png with half its IDAT and no IEND": _truncated_idat(),
    "png with a bad CRC": GOOD_PNG[:29] + b"\0\0\0\0" + GOOD_PNG[33:],
    "png header of zero size": png_bomb(0, 0),
    "jpeg cut short": GOOD_JPEG[:100],
    "jpeg body of noise": GOOD_JPEG[:300] + bytes(range(256)) * 4,
    "webp magic only": b"RIFF\0\0\0\0WEBPVP8 " + bytes(40),
}


@pytest.mark.parametrize("data", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_images_are_invalid_image(data):
    try:
        decode(data, max_pixels=MAX_PIXELS)
    except ImageDecodeError as exc:
        assert exc.error_type == "invalid_image"
    # A decoder may also recover an image from a damaged body (libjpeg does); never another exception.


PILLOW_RAISES = [Image.DecompressionBombError("bomb"), Image.DecompressionBombWarning("bomb"),
                 UnidentifiedImageError("what is it"), OSError("image file is truncated"), ValueError("bad"),
                 SyntaxError("not a PNG file"), struct.error("unpack requires a buffer"), EOFError(),
                 IndexError("out of range"), zlib.error("incorrect header check")]


@pytest.mark.parametrize("where", ["open", "convert"])
@pytest.mark.parametrize("exc", PILLOW_RAISES, ids=[type(e).__name__ for e in PILLOW_RAISES])
def test_every_pillow_exception_is_invalid_image(monkeypatch, where, exc):
    def boom(*_a, **_k):
        raise exc

    if where == "open":
        monkeypatch.setattr(imagefile.Image, "open", boom)
    else:
        monkeypatch.setattr(imagefile.Image.Image, "convert", boom)
    with pytest.raises(ImageDecodeError) as info:
        decode(GOOD_PNG, max_pixels=MAX_PIXELS)
    bomb = isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning))
    assert isinstance(info.value, ImageTooLargeError) == bomb
    assert info.value.__cause__ is exc


@pytest.mark.parametrize("where", ["decode_jpeg_header", "decode_jpeg"])
@pytest.mark.parametrize("exc", [ValueError("corrupt"), RuntimeError("libjpeg-turbo said no")],
                         ids=["ValueError", "RuntimeError"])
def test_every_simplejpeg_exception_is_invalid_image(monkeypatch, where, exc):
    def boom(*_a, **_k):
        raise exc

    monkeypatch.setattr(imagefile.simplejpeg, where, boom)
    with pytest.raises(ImageDecodeError) as info:
        decode(GOOD_JPEG, max_pixels=MAX_PIXELS)
    assert not isinstance(info.value, ImageTooLargeError) and info.value.__cause__ is exc


def test_redis_wire_images_go_through_the_same_helper():
    small = ImageMeta(codec="png", width=SIZE, height=SIZE)
    with pytest.raises(ImageTooLargeError):  # bytes that claim more than their meta
        decode_image(small, PNG_BOMB, max_pixels=MAX_PIXELS)
    with pytest.raises(ImageTooLargeError):
        decode_image(ImageMeta(codec="jpeg", width=SIZE, height=SIZE), JPEG_BOMB, max_pixels=MAX_PIXELS)
    with pytest.raises(ImageTooLargeError):  # a meta over the limit: refused before the bytes are read
        decode_image(ImageMeta(codec="png", width=30000, height=30000), PNG_BOMB, max_pixels=MAX_PIXELS)
    with pytest.raises(ImageDecodeError):
        decode_image(small, GOOD_PNG[:50], max_pixels=MAX_PIXELS)
    assert np.array_equal(decode_image(small, GOOD_PNG, max_pixels=MAX_PIXELS), _img())


# ------------------------------------------------------------------------------------ servers
def _local_port(r: httpx.Response) -> int | None:
    """The client-side port of the connection that carried ``r`` (same port: same keep-alive
    connection); ``None`` once that connection is closed."""
    try:
        return r.extensions["network_stream"].get_extra_info("client_addr")[1]
    except OSError:
        return None


def _rest_bomb_then_valid_on_one_connection(url: str) -> None:
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        health = client.get("/health")
        assert health.status_code == 200
        port = _local_port(health)
        assert port is not None
        for name, bomb in BOMBS:
            r = client.post("/v1/images/edits", files={"image": (name, bomb, "application/octet-stream")},
                            data={"prompt": "x", "size": f"{SIZE}x{SIZE}"})
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert (err["code"], err["param"]) == ("invalid_image", "image")
            assert r.headers.get("connection", "").lower() != "close"
            ok = client.post("/v1/images/edits", files={"image": ("ok.png", GOOD_PNG, "image/png")},
                             data={"prompt": "x"})
            assert ok.status_code == 200, ok.text
            assert _local_port(r) == port and _local_port(ok) == port, f"{name}: the keep-alive connection was dropped"


def _ws_bomb_then_valid_on_one_socket(ws_url: str) -> None:
    async def main() -> None:
        async with websockets.connect(ws_url, additional_headers=AUTH, max_size=None) as ws:
            assert (await recv_json(ws))["type"] == "ready"
            for i, (_name, bomb) in enumerate(BOMBS):
                await ws.send(frame_message(bomb, 2 * i))
                err = await recv_json(ws)
                assert (err["type"], err["code"], err.get("field")) == ("error", "invalid_image", "image"), err
                await ws.send(frame_message(GOOD_JPEG, 2 * i + 1))
                header, out = await recv_frame(ws)
                assert header["seq"] == 2 * i + 1 and out.shape == (SIZE, SIZE, 3)
            assert ws.close_code is None

    asyncio.run(main())


@pytest.fixture(scope="module")
def server():
    settings = Settings(model="null", api_keys=[KEY], default_width=SIZE, default_height=SIZE,
                        max_pixels=MAX_PIXELS)
    with ServerThread(create_app(settings, null_runner(EngineConfig(max_pixels=MAX_PIXELS)))) as srv:
        yield srv


def test_rest_bomb_is_413_and_the_connection_lives_on(server):
    _rest_bomb_then_valid_on_one_connection(server.url)


def test_ws_bomb_is_an_in_band_invalid_image_and_the_stream_goes_on(server):
    _ws_bomb_then_valid_on_one_socket(server.ws_url)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    from ditstream.server.scale.config import ScaleConfig
    from ditstream.server.scale.gateway import RedisGatewayRunner
    from ditstream.server.scale.worker import Worker

    from ditstream.bench.scale_harness import RedisServer, redis_server_binary, wait_for

    if redis_server_binary() is None:
        pytest.fail("redis-server is required (apt-get install -y redis-server)", pytrace=False)
    with RedisServer(log_dir=tmp_path_factory.mktemp("redis-bomb")) as rs:
        settings = Settings(model="null", api_keys=[KEY], default_width=SIZE, default_height=SIZE,
                            max_pixels=MAX_PIXELS, redis_url=rs.url, redis_prefix=f"b{uuid.uuid4().hex[:8]}",
                            worker_heartbeat_s=0.2, worker_ttl_s=2.0)
        scfg = ScaleConfig.from_settings(settings)
        worker = Worker(null_runner(EngineConfig(max_pixels=MAX_PIXELS)), scfg, worker_id="w-bomb").start()
        gw = RedisGatewayRunner.from_settings(settings)
        try:
            with ServerThread(create_app(settings, gw)) as srv:
                wait_for(lambda: gw.alive, 30, what="the gateway sees the worker")
                yield srv, scfg, worker
        finally:
            worker.stop()


def test_gateway_rest_bomb_is_413_and_the_connection_lives_on(gateway):
    srv, _, _ = gateway
    _rest_bomb_then_valid_on_one_connection(srv.url)


def test_gateway_ws_bomb_is_an_in_band_invalid_image_and_the_stream_goes_on(gateway):
    srv, _, _ = gateway
    _ws_bomb_then_valid_on_one_socket(srv.ws_url)


@pytest.mark.parametrize("codec,bomb", [("png", PNG_BOMB), ("jpeg", JPEG_BOMB)])
def test_worker_answers_a_bomb_on_the_wire_with_invalid_image(gateway, codec, bomb):
    """A job whose image bytes are a bomb (the gateway never sends one; the worker checks anyway)."""
    from ditstream.bench.scale_harness import wait_for

    _, scfg, worker = gateway
    reply_to = f"{scfg.prefix}:bomb-replies:{uuid.uuid4().hex[:6]}"
    cfg = StreamConfig(prompt="p", mode="img2img", width=SIZE, height=SIZE)
    job = JobMessage(reply_to=reply_to, config=config_to_wire(cfg), deadline=time.time() + 30,
                     image=ImageMeta(codec=codec, width=SIZE, height=SIZE))
    r = redis.Redis.from_url(scfg.redis_url)
    try:
        r.xadd(scfg.keys.jobs, {"m": job.dump(), "img": bomb})
        entries = wait_for(lambda: r.xrange(reply_to), 20, what="the worker's reply")
        result = JobResult.load(entries[0][1][b"m"])
        assert result.job == job.job and result.image is None
        assert result.error is not None and result.error.code == "invalid_image", result
        assert worker.error is None
    finally:
        r.close()
