"""Outputs from the server (issue 28): a live session restreamed over RTMP to Debian's ``ffmpeg`` as a
loopback listener and recorded into the record folder, checked against the session's own WebSocket
output; and the policy that refuses what the operator did not allow. Everything on 127.0.0.1.

One session carries the whole restream story (one run, several checks): output A (RTMP, listener kept)
must decode to the WebSocket's frames in order at > 30 dB PSNR and hold exactly the frames it says it
sent; output B's listener is killed mid-stream, B turns ``failed`` with a reason while the stream
and A go on; C (``file:``) ends with the session and is a playable MP4 of the same frames.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import websockets
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.live import outputs as outputs_module
from ditstream.server.settings import Settings
from testkit import decode_output, frame_message, free_port, jpeg, recv_json

from ditstream.bench.harness import ServerThread

FFMPEG = "/usr/bin/ffmpeg"
KEY = "k-outputs-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZE = 128
FPS = 20
STREAM_KEY = "sk_live_SECRET123"


def _image(i: int) -> np.ndarray:
    """Frame ``i``: a gradient and a bright square that moves 4 px a frame (neighbours differ by far
    more than the codecs' error, so each decoded frame has one best match)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    img = np.stack([x * 255 // SIZE, y * 255 // SIZE, np.full_like(x, (i * 37) % 200)], -1).astype(np.uint8)
    pos = (i * 4) % (SIZE - 24)
    img[40:64, pos:pos + 24] = 250
    return img


def _psnr(a: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """PSNR (dB) of ``a`` (H, W, 3) against each of ``frames`` (N, H, W, 3)."""
    mse = np.mean((frames.astype(np.float32) - a.astype(np.float32)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-6))


def _decode(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame of a video file, and its time in seconds."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames]


def _matches(decoded: list[np.ndarray], sent: list[np.ndarray]) -> list[int]:
    """For each decoded frame, the index of the WebSocket output it is (best PSNR, which must be > 30 dB)."""
    out, stack = [], np.stack(sent)
    for k, frame in enumerate(decoded):
        scores = _psnr(frame, stack)
        best = int(np.argmax(scores))
        assert scores[best] > 30, f"decoded frame {k} matches no WebSocket output (best {scores[best]:.1f} dB)"
        out.append(best)
    return out


class Listener:
    """Debian's ffmpeg as an RTMP server on loopback, copying what it receives into ``out``."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.port, self.out = free_port(), tmp / f"{name}.flv"
        self.log = open(tmp / f"{name}.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "warning", "-listen", "1", "-i",
                                      f"rtmp://127.0.0.1:{self.port}/live", "-c", "copy", "-y", str(self.out)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self._listening():  # the port in LISTEN state (probing it would take ffmpeg's one connection)
            assert self.proc.poll() is None and time.monotonic() < deadline, "ffmpeg never listened"
            time.sleep(0.02)

    def _listening(self) -> bool:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return any(r.split()[1].endswith(f":{self.port:04X}") and r.split()[3] == "0A" for r in rows)

    @property
    def url(self) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{STREAM_KEY}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def server(tmp_path: Path):
    record = tmp_path / "record"
    record.mkdir()
    settings = Settings(model="null", default_width=SIZE, default_height=SIZE, api_keys=[KEY],
                        outputs=["rtmp", "file"], output_hosts=["127.0.0.1"], record_dir=str(record),
                        output_bitrate=4_000_000)
    with ServerThread(create_app(settings, null_runner())) as srv:
        yield srv, record


def _output_thread(output_id: str) -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == f"ditstream-output-{output_id}")


@pytest.mark.skipif(shutil.which(FFMPEG) is None, reason="Debian's ffmpeg is the RTMP listener (scripts/install --test)")
def test_a_session_restreamed_and_recorded_matches_its_websocket_output(server, tmp_path: Path):
    srv, record = server
    a, b = Listener(tmp_path, "a"), Listener(tmp_path, "b")
    try:
        asyncio.run(_restream(srv, record, a, b))
    finally:
        a.stop()
        b.stop()


async def _restream(srv: ServerThread, record: Path, a: Listener, b: Listener) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=30) as http:
        ws = await websockets.connect(srv.ws_url, additional_headers=AUTH)
        session = (await recv_json(ws))["session"]
        base = f"/v1/sessions/{session}/outputs"
        made = {}
        for name, url in (("a", a.url), ("b", b.url), ("c", "file:rec.mp4")):
            r = await http.post(base, json={"url": url})
            assert r.status_code == 201, r.text
            assert STREAM_KEY not in r.text and r.json()["state"] == "connecting"
            made[name] = r.json()["id"]
        recording = _output_thread(made["c"])

        sent, arrived, t0 = [], [], time.monotonic()
        live_at = failed_at = None  # frame indices: all three outputs live; B seen failed
        a_at_failure, reason = 0, ""
        for i in range(600):
            await ws.send(frame_message(jpeg(_image(i), quality=95), seq=i))
            header, image = decode_output(await asyncio.wait_for(_next_binary(ws), 30))
            assert header["seq"] == i
            sent.append(image)
            arrived.append(time.monotonic())
            if i % 5 == 4 and failed_at is None:
                states = {o["id"]: o for o in (await http.get(base)).json()["outputs"]}
                if live_at is None and all(states[made[n]]["state"] == "live" for n in "abc"):
                    live_at = i
                    b.proc.kill()  # B's receiver disappears mid-stream
                elif live_at is not None and states[made["b"]]["state"] == "failed":
                    failed_at, a_at_failure, reason = i, states[made["a"]]["frames_sent"], states[made["b"]]["reason"]
            if failed_at is not None and i >= max(30, failed_at + 10):
                break
            # The stream's pace (a client sending at FPS), not a wait for an event.
            await asyncio.sleep(max(0.0, t0 + (i + 1) / FPS - time.monotonic()))
        assert live_at is not None, f"the outputs never all went live: {states}"
        assert failed_at is not None, f"B never turned failed after its listener was killed: {states}"
        assert reason and STREAM_KEY not in reason, reason

        states = {o["id"]: o for o in (await http.get(base)).json()["outputs"]}
        assert states[made["a"]]["state"] == "live" and states[made["a"]]["frames_sent"] > a_at_failure + 5, states
        assert states[made["a"]]["bitrate_bps"] > 0

        r = await http.delete(f"{base}/{made['a']}")
        assert r.status_code == 200 and r.json()["state"] == "ended", r.text
        a_sent = r.json()["frames_sent"]
        assert a_sent >= (len(sent) - live_at) // 2, f"A sent {a_sent} of {len(sent)} frames ({live_at} before live)"
        metrics = (await http.get("/metrics")).text
        for line in ('ditstream_outputs_finished_total{outcome="failed"} 1.0',
                     'ditstream_outputs_finished_total{outcome="ended"} 1.0', "ditstream_outputs_active 1.0"):
            assert line in metrics, line
        await ws.close()
        recording.join(15)
        assert not recording.is_alive(), "the recording did not end with its session"
        assert (await http.get(base)).status_code == 404
    a.proc.wait(15)  # the listener ends when its publisher closed: the file is complete
    frames, times = _decode(a.out)
    got = _matches(frames, sent)
    assert len(got) == a_sent, f"A wrote {a_sent} frames, the listener got {len(got)}"
    assert got == sorted(set(got)), f"A's frames out of order or repeated: {got}"
    assert got[-1] >= len(sent) - 3, "A's last frames were lost at DELETE"
    # The stream's own rate: the video's clock runs with the WebSocket outputs' arrivals.
    span, video_span = arrived[got[-1]] - arrived[got[0]], times[-1] - times[0]
    assert abs(video_span - span) < 0.25, f"the video spans {video_span:.2f} s, the stream {span:.2f} s"

    rec = _matches(_decode(record / "rec.mp4")[0], sent)
    assert len(rec) >= (len(sent) - live_at) // 2 and rec == sorted(set(rec)), rec
    assert rec[-1] >= len(sent) - 3, "the recording lost the session's last frames"


async def _next_binary(ws) -> bytes:
    while True:
        msg = await ws.recv()
        if isinstance(msg, bytes):
            return msg


def test_a_receiver_that_takes_no_data_fails_its_output_not_the_stream(server, monkeypatch):
    """A TCP peer that never answers the RTMP handshake: the output's thread blocks in FFmpeg; the
    output turns ``failed`` (stalled) after ``STALL_S`` and the stream's frames keep coming meanwhile."""
    monkeypatch.setattr(outputs_module, "STALL_S", 0.5)
    srv, _ = server
    with socket.create_server(("127.0.0.1", 0)) as mute:  # connections complete in the backlog; none is read
        asyncio.run(_stalled(srv, mute.getsockname()[1]))


async def _stalled(srv: ServerThread, port: int) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=30) as http, \
            websockets.connect(srv.ws_url, additional_headers=AUTH) as ws:
        base = f"/v1/sessions/{(await recv_json(ws))['session']}/outputs"
        r = await http.post(base, json={"url": f"rtmp://127.0.0.1:{port}/live/{STREAM_KEY}"})
        assert r.status_code == 201, r.text
        state, t0 = None, time.monotonic()
        for i in range(100):
            await ws.send(frame_message(jpeg(_image(i)), seq=i))
            header, _ = decode_output(await asyncio.wait_for(_next_binary(ws), 30))
            assert header["seq"] == i, "the stream must go on while its output is stuck"
            state = (await http.get(base)).json()["outputs"][0]
            if state["state"] == "failed":
                break
            await asyncio.sleep(max(0.0, t0 + (i + 1) / FPS - time.monotonic()))  # the stream's pace
        assert state is not None and state["state"] == "failed", state
        assert "stalled" in state["reason"] and state["frames_sent"] == 0, state


def test_a_stopped_output_writes_what_it_holds_then_ends(tmp_path: Path):
    """``stop`` (DELETE, the session's end) right after two frames: both are written, the MP4 is closed."""
    from ditstream.server.live.outputs import Output, Pending
    from ditstream.server.live.outputs_policy import parse_target, reserve_file

    settings = Settings(model="null", outputs=["file"], record_dir=str(tmp_path))
    target = parse_target("file:two.mp4", settings)
    reserve_file(target)
    output = Output(target, settings, "s1")
    output.start()
    now = time.monotonic()
    output.feed(Pending(_image(0), now))
    output.feed(Pending(_image(9), now + 0.05))
    output.stop()
    output.feed(Pending(_image(5), now + 0.1))  # after stop: not taken
    output.join(30)
    assert (output.state, output.frames_sent, output.frames_dropped) == ("ended", 2, 0), output.snapshot()
    frames, times = _decode(tmp_path / "two.mp4")
    assert _matches(frames, [_image(0), _image(9)]) == [0, 1] and abs(times[1] - times[0] - 0.05) < 0.002


def test_an_output_keeps_its_first_size_when_the_stream_is_resized(tmp_path: Path):
    from ditstream.server.live.outputs import Output, Pending
    from ditstream.server.live.outputs_policy import parse_target, reserve_file

    settings = Settings(model="null", outputs=["file"], record_dir=str(tmp_path))
    target = parse_target("file:sizes.mp4", settings)
    reserve_file(target)
    output = Output(target, settings, "s1")
    output.start()
    small = _image(2)[::2, ::2]  # the client resized the stream to 64×64
    output.feed(Pending(_image(1), time.monotonic()))
    output.feed(Pending(np.ascontiguousarray(small), time.monotonic() + 0.05))
    output.stop()
    output.join(30)
    frames, _ = _decode(tmp_path / "sizes.mp4")
    assert [f.shape for f in frames] == [(SIZE, SIZE, 3)] * 2 and output.frames_sent == 2
    scaled = np.asarray(av.VideoFrame.from_ndarray(frames[1], format="rgb24").reformat(64, 64).to_ndarray())
    assert _psnr(small, scaled[None]).item() > 25, "the smaller frame was not scaled to the output's size"


def test_a_webrtc_session_is_recorded_like_a_websocket_one(server):
    """Outputs hang on the one stream session: a WHIP publisher's session records as a WebSocket's does."""
    srv, record = server
    image = _image(3)
    sent = asyncio.run(_record_webrtc(srv, image))
    decoded, _ = _decode(record / "rtc.mp4")
    assert len(decoded) == sent >= 10, (len(decoded), sent)
    assert _psnr(image, np.stack(decoded[-3:])).min() > 25, "the recording is not the published picture"


async def _record_webrtc(srv: ServerThread, image: np.ndarray) -> int:
    """Publish ``image`` over WHIP, record the session until 10 frames are written; the frames written."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from rtckit import Source

    pc = RTCPeerConnection()
    pc.addTrack(Source(image))
    try:
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=30) as http:
            await pc.setLocalDescription(await pc.createOffer())
            r = await http.post("/v1/whip", content=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"})
            assert r.status_code == 201, r.text
            await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
            base = f"/v1/sessions/{r.headers['x-ditstream-session']}/outputs"
            r = await http.post(base, json={"url": "file:rtc.mp4"})
            assert r.status_code == 201, r.text
            output, deadline = r.json(), time.monotonic() + 60
            while output["frames_sent"] < 10:  # the server's count (no event to wait on); bounded
                assert output["state"] in ("connecting", "live") and time.monotonic() < deadline, output
                await asyncio.sleep(0.1)
                output = (await http.get(base)).json()["outputs"][0]
            r = await http.delete(f"{base}/{output['id']}")
            assert r.status_code == 200 and r.json()["state"] == "ended", r.text
            return r.json()["frames_sent"]
    finally:
        await pc.close()


# ------------------------------------------------------------------------------------ refusals
#: (URL, status, code, words the message must hold) — each refused on one live session of ``server``.
REFUSED = [
    ("srt://127.0.0.1:9000", 403, "output_refused", "srt outputs are not allowed"),
    ("http://127.0.0.1/x", 422, "invalid_output", "unsupported output"),
    ("rtmp://10.1.2.3/live/k", 403, "output_refused", "private"),
    ("rtmp://169.254.1.1/live/k", 403, "output_refused", "link-local"),
    ("rtmp://[::1]/live/k", 403, "output_refused", "loopback"),
    ("rtmp://8.8.8.8/live/k", 403, "output_refused", "--output-hosts"),
    ("rtmp:///live/k", 422, "invalid_output", "needs a host"),
    ("file:../escape.mp4", 422, "invalid_output", "plain name"),
    ("file:/tmp/x.mp4", 422, "invalid_output", "plain name"),
    ("file:sub/x.mp4", 422, "invalid_output", "plain name"),
    ("file:x.mkv", 422, "invalid_output", "plain name"),
    ("file:taken.mp4", 409, "output_exists", "never overwritten"),
]


def test_refused_outputs_say_why_and_touch_nothing(server):
    srv, record = server
    (record / "taken.mp4").write_bytes(b"precious")
    answers = asyncio.run(_post_in_session(srv, [url for url, *_ in REFUSED]))
    for (url, status, code, says), r in zip(REFUSED, answers, strict=True):
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (url, r.text)
        assert says in r.json()["error"]["message"], (url, r.text)
    assert (record / "taken.mp4").read_bytes() == b"precious"
    assert sorted(p.name for p in record.iterdir()) == ["taken.mp4"], "a refused output left a file"


async def _post_in_session(srv: ServerThread, urls: list[str]) -> list[httpx.Response]:
    async with websockets.connect(srv.ws_url, additional_headers=AUTH) as ws:
        session = (await recv_json(ws))["session"]
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            path = f"/v1/sessions/{session}/outputs"
            assert (await http.post(path, json={"url": urls[0]})).status_code == 401, "outputs need the API key"
            assert (await http.post("/v1/sessions/nope/outputs", json={"url": "file:a.mp4"},
                                    headers=AUTH)).status_code == 404
            return [await http.post(path, json={"url": url}, headers=AUTH) for url in urls]


def test_outputs_are_off_unless_enabled_and_a_gateway_refuses_them():
    with ServerThread(create_app(Settings(model="null", default_width=SIZE, default_height=SIZE),
                                 null_runner())) as srv:
        assert httpx.get(srv.url + "/v1/outputs").json()["enabled"] is False
        for method, path in (("POST", "/v1/sessions/s1/outputs"), ("GET", "/v1/sessions/s1/outputs"),
                             ("DELETE", "/v1/sessions/s1/outputs/o1")):
            r = httpx.request(method, srv.url + path, json={"url": "rtmp://127.0.0.1/live/k"})
            assert (r.status_code, r.json()["error"]["code"]) == (403, "outputs_disabled"), r.text
    gateway = Settings(model="null", redis_url="redis://127.0.0.1:1")  # never connected: the route answers first
    with ServerThread(create_app(gateway, null_runner())) as srv:
        r = httpx.post(srv.url + "/v1/sessions/s1/outputs", json={"url": "rtmp://127.0.0.1/live/k"})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "outputs_unavailable"), r.text
        assert "all-in-one" in r.json()["error"]["message"]


@pytest.mark.parametrize(("settings", "says"), [
    ({"outputs": "ftp"}, "unknown kind"),
    ({"outputs": "file"}, "needs --record-dir"),
    ({"outputs": "file", "record_dir": "/nonexistent/rec"}, "is not a folder"),
    ({"outputs": "rtmp", "redis_url": "redis://127.0.0.1:1"}, "all-in-one"),
    ({"outputs": "rtmp", "output_hosts": "bad/host!"}, "neither an address"),
    ({"outputs": "rtmp", "output_encoder": "no-such-encoder"}, "not an encoder"),
])
def test_bad_output_settings_stop_start_up(settings: dict, says: str):
    with pytest.raises(ValueError, match=says):
        Settings(**settings)


def test_the_page_learns_what_the_server_allows(server):
    srv, _ = server
    info = httpx.get(srv.url + "/v1/outputs", headers=AUTH).json()
    assert info == {"enabled": True, "kinds": ["rtmp", "file"], "max_outputs": 4, "reason": None}
    assert httpx.get(srv.url + "/v1/outputs").status_code == 401
    assert '<script src="/web/outputs.js"></script>' in httpx.get(srv.url + "/").text
    assert httpx.get(srv.url + "/web/outputs.js").status_code == 200


def test_outputs_without_pyav_stop_start_up_naming_the_extra(monkeypatch):
    """A base install has no PyAV (it comes with the ``outputs`` and ``webrtc`` extras): ``--outputs``
    then stops start-up saying what to install, not with a traceback at the first output."""
    monkeypatch.setitem(sys.modules, "av", None)  # ``import av`` raises ImportError
    with pytest.raises(ValueError, match=r"PyAV, which is not installed: pip install 'ditstream\[outputs\]'"):
        Settings(outputs="rtmp")
