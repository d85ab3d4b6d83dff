"""WebRTC (issue 20): WHIP ingest, WHEP playback and live config against a real uvicorn server on loopback.

An aiortc client publishes a synthetic video track over WHIP and watches the session over WHEP; the
null engine echoes, so what comes back must be what was sent (within VP8's loss). Waiting is always
for an observable event (a frame that matches, a reply, a counter), bounded by a timeout, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiortc
import av
import httpx
import numpy as np
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.live.webrtc_jitter import FrameEndJitterBuffer
from ditstream.server.settings import Settings
from rtckit import Source
from serverkit import KINDS, serve
from testkit import frame_message, jpeg

from ditstream.bench.harness import ServerThread

SIZE = 64
TIMEOUT = 30.0


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random image (4x4 random colour blocks): survives a video codec."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size // 4, size // 4, 1), np.uint8))


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return frame.reformat(width=size, height=size, format="rgb24").to_ndarray()


async def _negotiate(client: httpx.AsyncClient, pc: RTCPeerConnection, url: str,
                     **kw) -> httpx.Response:
    await pc.setLocalDescription(await pc.createOffer())
    r = await client.post(url, content=pc.localDescription.sdp, headers={"Content-Type": "application/sdp",
                                                                         **kw.pop("headers", {})}, **kw)
    if r.status_code == 201:
        assert r.headers["content-type"].startswith("application/sdp")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
    return r


class Publisher:
    """A WHIP client: a synthetic track and a ``control`` data channel."""

    def __init__(self, image: np.ndarray) -> None:
        self.pc = RTCPeerConnection()
        self.source = Source(image)
        self.pc.addTrack(self.source)
        self.control = self.pc.createDataChannel("control")
        self.messages: asyncio.Queue[dict] = asyncio.Queue()
        self.control.on("message", lambda m: self.messages.put_nowait(json.loads(m)))
        self.location = ""

    async def publish(self, client: httpx.AsyncClient, query: str = "") -> httpx.Response:
        r = await _negotiate(client, self.pc, "/v1/whip" + query)
        if r.status_code == 201:
            self.location = r.headers["location"]
        return r

    @property
    def session(self) -> str:
        return self.location.rsplit("/", 1)[1]

    async def reply(self, kind: str) -> dict:
        while True:
            msg = await asyncio.wait_for(self.messages.get(), TIMEOUT)
            if msg["type"] == kind:
                return msg
            assert msg["type"] != "error", msg


class Viewer:
    """A WHEP client: a recvonly video transceiver; its frames as RGB arrays."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.frames: asyncio.Queue[np.ndarray] = asyncio.Queue()
        self.pc.on("track", self._on_track)
        self.readers: list[asyncio.Task] = []

    def _on_track(self, track) -> None:
        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except aiortc.mediastreams.MediaStreamError:
                    return
                self.frames.put_nowait(frame.to_ndarray(format="rgb24"))

        self.readers.append(asyncio.ensure_future(read()))

    async def until(self, want: np.ndarray, tol: float = 22.0) -> np.ndarray:
        """The first frame of ``want``'s size within ``tol`` of it (mean abs difference). Two test
        images differ by > 40; VP8 both ways costs up to ~9 and, through the gateway, the frame's JPEG
        q90 hop to the worker (4:2:0, sharp 8-pixel blocks) up to another ~9 at 32×32 (17.5 seen)."""
        deadline = time.monotonic() + TIMEOUT
        last = "none"
        while True:
            left = deadline - time.monotonic()
            try:
                got = await asyncio.wait_for(self.frames.get(), max(left, 0.0))
            except TimeoutError:
                raise AssertionError(f"no frame like the one sent within {TIMEOUT}s (last: {last})") from None
            if got.shape == want.shape and _diff(got, want) < tol:
                return got
            last = f"{got.shape}, {_diff(got, want) if got.shape == want.shape else '-'} from the one sent"


def _server(**settings):
    s = {"model": "null", "default_width": SIZE, "default_height": SIZE, "max_streams": 2, **settings}
    delay = s.pop("delay_s", 0.0)
    return ServerThread(create_app(Settings(**s), null_runner(delay_s=delay)))


def _state(srv):
    return srv.app.state.ditstream


def _transport_gauge(srv, transport: str) -> float:
    return _state(srv).metrics.streams_by_transport.labels(transport)._value.get()


@pytest.fixture(params=KINDS)
def rtc_server(request):
    """The WHIP/WHEP round trip against the in-process engine and through the Redis gateway."""
    def runner():
        return null_runner()

    with serve(request, "null_fleet", runner, model="null", default_width=SIZE, default_height=SIZE,
               max_streams=2) as srv:
        yield srv


def test_whip_whep_round_trip_config_and_delete(rtc_server):
    a, b = _image(1), _image(2)
    assert _diff(a, b) > 40  # the images are told apart by far more than the codec's loss

    async def main(srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            pub = Publisher(a)
            r = await pub.publish(client, "?prompt=hello&steps=2")
            assert r.status_code == 201, r.text
            assert pub.location.startswith("/v1/whip/")
            session = _state(srv).webrtc[pub.session]
            assert session.config.prompt == "hello" and session.config.steps == 2
            video = [t.receiver for t in session.pc.getTransceivers() if t.kind == "video"]
            assert video and all(isinstance(r._RTCRtpReceiver__jitter_buffer, FrameEndJitterBuffer)
                                 for r in video), "the published video completes frames at their last packet"
            assert _state(srv).admission.streams.in_use == 1 and _transport_gauge(srv, "webrtc") == 1

            viewer, second = Viewer(), Viewer()
            for v in (viewer, second):
                r = await _negotiate(client, v.pc, f"/v1/whep/{pub.session}")
                assert r.status_code == 201, r.text
                assert r.headers["location"].startswith(f"/v1/whep/{pub.session}/")
            await viewer.until(a)
            await second.until(a)  # several viewers watch one session
            pub.source.image = b
            await viewer.until(b)  # live: what is sent now comes back now

            ready = await pub.reply("ready")  # the control channel greets like the WebSocket
            assert ready["session"] == pub.session
            pub.control.send(json.dumps({"type": "config", "size": "48x48", "prompt": "over the channel"}))
            applied = (await pub.reply("config"))["applied"]
            assert (applied["width"], applied["height"], applied["prompt"]) == (48, 48, "over the channel")
            await viewer.until(_resized(b, 48))
            pub.control.send(json.dumps({"type": "config", "steps": 99}))
            err = await pub.reply("error")
            assert err["code"] == "validation_error" and "steps" in err["message"], err

            r = await client.post(f"/v1/sessions/{pub.session}/config", json={"size": "32x32", "strength": 0.5})
            assert r.status_code == 200, r.text
            assert (r.json()["applied"]["width"], r.json()["applied"]["strength"]) == (32, 0.5)
            await viewer.until(_resized(b, 32))
            r = await client.post(f"/v1/sessions/{pub.session}/config", json={"steps": 99})
            assert r.status_code == 422 and r.json()["error"]["param"] == "steps", r.text
            r = await client.post(f"/v1/sessions/{pub.session}/config", json={"nope": 1})
            assert r.status_code == 422 and "nope" in r.json()["error"]["message"], r.text
            assert (await client.post("/v1/sessions/unknown/config", json={})).status_code == 404

            r = await client.delete(pub.location)
            assert r.status_code == 200
            assert _state(srv).admission.streams.in_use == 0 and not _state(srv).webrtc
            assert _transport_gauge(srv, "webrtc") == 0 and not _state(srv).sessions
            assert (await client.delete(pub.location)).status_code == 404
            assert (await client.post(f"/v1/whep/{pub.session}", content="v=0\r\n",
                                      headers={"Content-Type": "application/sdp"})).status_code == 404
            for pc in (pub.pc, viewer.pc, second.pc):
                await pc.close()

    asyncio.run(main(rtc_server))


def test_a_peer_that_goes_away_frees_its_stream():
    async def main(srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            pub = Publisher(_image(3))
            assert (await pub.publish(client)).status_code == 201
            assert _state(srv).admission.streams.in_use == 1
            await pub.reply("ready")  # connected (else the connect timeout, 20 s, would be what frees it)
            t0 = time.monotonic()
            await pub.pc.close()  # no DELETE: the server sees the DTLS close
            while _state(srv).admission.streams.in_use:
                assert time.monotonic() - t0 < 5, "the session outlived its peer"
                await asyncio.sleep(0.05)
            assert not _state(srv).webrtc
            print(f"freed {time.monotonic() - t0:.2f} s after the peer closed")

    with _server() as srv:
        asyncio.run(main(srv))


def _vanish(pc: RTCPeerConnection) -> None:
    """The peer's UDP sockets go away with no DTLS close or DELETE: a closed laptop, a lost network."""
    for transceiver in pc.getTransceivers():
        for proto in transceiver.sender.transport.transport._connection._protocols:
            proto.transport.close()


def test_a_peer_that_vanishes_frees_its_stream_when_consent_expires():
    """Nothing says goodbye: ICE consent checks go unanswered, and after webrtc_peer_timeout_s the
    session is freed (the default, 20 s, expires within 25 s: the acceptance's 30 s, with margin)."""
    timeout = 2.0

    async def main(srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            pub, viewer = Publisher(_image(3)), Viewer()
            assert (await pub.publish(client)).status_code == 201
            assert (await _negotiate(client, viewer.pc, f"/v1/whep/{pub.session}")).status_code == 201
            await viewer.until(pub.source.image)  # connected and flowing
            t0 = time.monotonic()
            _vanish(pub.pc)
            while _state(srv).admission.streams.in_use:
                assert time.monotonic() - t0 < timeout * 1.2 + 3, "the session outlived its vanished peer"
                await asyncio.sleep(0.05)
            assert not _state(srv).webrtc and _transport_gauge(srv, "webrtc") == 0
            print(f"freed {time.monotonic() - t0:.1f} s after the peer vanished (timeout {timeout} s)")
            for pc in (pub.pc, viewer.pc):
                await pc.close()

    with _server(webrtc_peer_timeout_s=timeout) as srv:
        asyncio.run(main(srv))
    assert Settings().webrtc_peer_timeout_s * 1.2 + 1 < 30


def test_whip_and_websocket_streams_share_model_calls():
    """One engine tick serves both transports: the null engine records a batch of 2."""
    async def main(srv):
        runner = _state(srv).runner
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            pub = Publisher(_image(4))
            assert (await pub.publish(client)).status_code == 201
            async with websockets.connect(srv.ws_url, max_size=None) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                data, seq = jpeg(_image(5)), 0
                deadline = time.monotonic() + TIMEOUT
                while 2 not in runner.core.batch_sizes:
                    assert time.monotonic() < deadline, f"never batched together: {runner.core.batch_sizes}"
                    await ws.send(frame_message(data, seq))  # lockstep: a frame, then its output
                    while not isinstance(await ws.recv(), bytes):
                        pass
                    seq += 1
            await client.delete(pub.location)
            await pub.pc.close()

    with _server(delay_s=0.05) as srv:
        asyncio.run(main(srv))


def test_refusals_bad_sdp_capacity_auth_trickle_and_missing_extra(monkeypatch):
    async def main(srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT,
                                     headers={"Authorization": "Bearer k1"}) as client:
            r = await client.post("/v1/whip", content="hello", headers={"Content-Type": "application/sdp"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "sdp", r.text
            assert "SDP" in r.json()["error"]["message"]
            r = await client.post("/v1/whip", content="v=0\r\nnonsense\r\n",
                                  headers={"Content-Type": "application/sdp"})
            assert r.status_code == 400 and "SDP offer" in r.json()["error"]["message"], r.text
            r = await client.post("/v1/whip", content="v=0", headers={"Content-Type": "text/plain"})
            assert r.status_code == 400 and "application/sdp" in r.json()["error"]["message"]
            no_video = RTCPeerConnection()
            no_video.createDataChannel("control")
            r = await _negotiate(client, no_video, "/v1/whip")
            assert r.status_code == 400 and "video" in r.json()["error"]["message"], r.text
            r = await _negotiate(client, Publisher(_image(6)).pc, "/v1/whip?steps=99")
            assert r.status_code == 422 and r.json()["error"]["param"] == "steps", r.text
            assert _state(srv).admission.streams.in_use == 0  # refused offers hold nothing

            async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as anonymous:
                r = await anonymous.post("/v1/whip", content="v=0", headers={"Content-Type": "application/sdp"})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"

            pub = Publisher(_image(7))
            assert (await pub.publish(client)).status_code == 201
            r = await client.patch(pub.location, content="a=candidate", headers={"Content-Type":
                                                                                 "application/trickle-ice-sdpfrag"})
            assert r.status_code == 405 and r.headers["allow"] == "GET, DELETE"
            over = Publisher(_image(8))
            r = await over.publish(client)  # max_streams=1
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            metrics = (await client.get("/metrics")).text
            assert 'ditstream_streams_by_transport{transport="webrtc"} 1.0' in metrics

            monkeypatch.setitem(sys.modules, "aiortc", None)  # as if the extra were not installed
            r = await client.post("/v1/whip", content="v=0", headers={"Content-Type": "application/sdp"})
            assert r.status_code == 501 and "pip install 'ditstream[webrtc]'" in r.json()["error"]["message"]
            monkeypatch.undo()
            await client.delete(pub.location)
            for pc in (pub.pc, over.pc, no_video):
                await pc.close()

    with _server(max_streams=1, api_keys="k1") as srv:
        asyncio.run(main(srv))


def test_ice_port_range_and_public_host_shape_the_answer():
    """Behind a firewall or in Docker: candidates on the configured ports, announcing the public address."""
    async def main(srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            pub = Publisher(_image(9))
            r = await pub.publish(client)
            assert r.status_code == 201, r.text
            candidates = [ln.split() for ln in r.text.splitlines() if ln.startswith("a=candidate:")]
            assert candidates, r.text
            assert {c[4] for c in candidates if c[7] == "host"} & {"203.0.113.7"}, candidates
            assert all(41000 <= int(c[5]) <= 41020 for c in candidates), candidates
            await client.delete(pub.location)
            await pub.pc.close()

    with _server(webrtc_port_range="41000-41020", webrtc_public_host="203.0.113.7") as srv:
        asyncio.run(main(srv))
    with pytest.raises(ValueError, match="LOW-HIGH"):
        Settings(webrtc_port_range="41020-41000")


def _rtp(seq: int, ts: int, marker: bool = False) -> RtpPacket:
    packet = RtpPacket(sequence_number=seq, timestamp=ts, marker=int(marker))
    packet._data = bytes([seq])
    return packet


def test_a_video_frame_is_complete_at_its_marked_last_packet_not_a_frame_later():
    """aiortc's own buffer hands a frame on at the next frame's first packet (one frame interval
    late); ours at the frame's marked last packet, and the old way when that packet was lost."""
    plain, ours = JitterBuffer(capacity=128, is_video=True), FrameEndJitterBuffer()
    frame = [_rtp(10, 900), _rtp(11, 900), _rtp(12, 900, marker=True)]
    assert [plain.add(p)[1] for p in frame] == [None, None, None]  # waits for the next frame
    got = [ours.add(p)[1] for p in frame]
    assert got[:2] == [None, None] and got[2] is not None
    assert (got[2].data, got[2].timestamp) == (bytes([10, 11, 12]), 900)
    assert plain.add(_rtp(13, 1800))[1].data == bytes([10, 11, 12])
    # Out of order: the marked packet first, then the missing middle one completes the frame.
    assert ours.add(_rtp(13, 1800))[1] is None
    assert ours.add(_rtp(15, 1800, marker=True))[1] is None
    late = ours.add(_rtp(14, 1800))[1]
    assert late is not None and late.data == bytes([13, 14, 15])
    # A sender that marks nothing: a frame completes when the next one starts, as before.
    assert ours.add(_rtp(16, 2700))[1] is None
    assert ours.add(_rtp(17, 2700))[1] is None
    fallback = ours.add(_rtp(18, 3600))[1]
    assert fallback is not None and (fallback.data, fallback.timestamp) == (bytes([16, 17]), 2700)
    # A gap before the marked packet (a lost packet, NACKed): nothing until it is retransmitted.
    assert ours.add(_rtp(20, 3600, marker=True))[1] is None
    assert ours.add(_rtp(19, 3600))[1].data == bytes([18, 19, 20])


# ------------------------------------------------------------------------------------ STUN/TURN for clients
TURN = {"webrtc_turn_urls": ["turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:443?transport=tcp"],
        "webrtc_turn_secret": "coturn-static-auth-secret", "webrtc_stun_servers": ["stun:stun.example.com:3478"]}


def test_turn_credentials_are_minted_per_client_never_the_secret():
    import base64
    import hashlib
    import hmac

    from ditstream.server.live.ice_servers import client_ice_servers, link_header

    servers, expires = client_ice_servers(Settings(model="null", webrtc_turn_ttl_s=600, **TURN), now=1_000_000)
    assert expires == 1_000_600
    stun, turn = servers
    assert stun.urls == ("stun:stun.example.com:3478",) and stun.username is None
    assert turn.urls == tuple(TURN["webrtc_turn_urls"]) and turn.username == "1000600:ditstream"
    # What coturn (use-auth-secret) recomputes from the username and its copy of the secret:
    want = base64.b64encode(hmac.new(b"coturn-static-auth-secret", b"1000600:ditstream", hashlib.sha1).digest())
    assert turn.credential == want.decode() and "coturn-static-auth-secret" not in str(servers)
    link = link_header(servers)
    assert link.count('rel="ice-server"') == 3 and '<turns:turn.example.com:443?transport=tcp>' in link
    assert f'username="1000600:ditstream"; credential="{turn.credential}"; credential-type="password"' in link
    assert client_ice_servers(Settings(model="null")) == ([], None) and link_header([]) is None
    with pytest.raises(ValueError, match="needs webrtc_turn_secret"):
        Settings(model="null", webrtc_turn_urls=["turn:t:3478"])
    with pytest.raises(ValueError, match="start with 'turn:' or 'turns:'"):
        Settings(model="null", webrtc_turn_urls=["stun:t:3478"], webrtc_turn_secret="s")


def test_clients_get_ice_servers_as_json_and_in_the_whip_whep_answers():
    async def main(srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            assert (await client.get("/v1/webrtc/ice-servers")).status_code == 401  # keys protect it
            auth = {"Authorization": "Bearer k-0123456789"}
            body = (await client.get("/v1/webrtc/ice-servers", headers=auth)).json()
            assert [s["urls"] for s in body["ice_servers"]] == [TURN["webrtc_stun_servers"], TURN["webrtc_turn_urls"]]
            assert body["expires_at"] > time.time() + 3500 and body["ice_servers"][1]["username"].endswith(":ditstream")
            client.headers.update(auth)
            pub, viewer = Publisher(_image(4)), Viewer()
            r = await pub.publish(client)
            assert r.status_code == 201 and r.headers["link"].count('rel="ice-server"') == 3, r.headers
            r = await _negotiate(client, viewer.pc, f"/v1/whep/{pub.session}")
            assert r.status_code == 201 and 'credential-type="password"' in r.headers["link"]
            await client.delete(pub.location)
            for pc in (pub.pc, viewer.pc):
                await pc.close()

    with _server(api_keys=["k-0123456789"], **TURN) as srv:
        asyncio.run(main(srv))


def test_the_txt2img_ticker_numbers_its_frames_as_the_websocket_does():
    """In txt2img the server makes the frames: each gets the next ``seq`` (0, 1, 2, ...), as on the
    WebSocket, so a generation error or a timing names the frame it belongs to (it once sent 0 always)."""
    async def main(srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            pub = Publisher(_image(4))
            assert (await pub.publish(client, "?mode=txt2img&prompt=ticking&fps=30")).status_code == 201
            session = _state(srv).webrtc[pub.session]
            seqs: list[int] = []
            real_submit = session.handle.submit

            def submit(image, seq=0, ts=0.0):
                seqs.append(seq)
                return real_submit(image, seq, ts)

            session.handle.submit = submit
            deadline = time.monotonic() + TIMEOUT
            while len(seqs) < 4:
                assert time.monotonic() < deadline, f"the ticker offered only {seqs}"
                await asyncio.sleep(0.01)
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
            await client.delete(pub.location)
            await pub.pc.close()

    with _server() as srv:
        asyncio.run(main(srv))
