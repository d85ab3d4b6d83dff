"""Interop (issue 27): FFmpeg's WHIP muxer — a publisher we did not write — against ``serve`` and a gateway.

FFmpeg 8.1 as bundled in PyAV's wheels (``tests/whip_ffmpeg.py``, a child process) publishes H.264
baseline 320x240 at 30 fps for 5 s; an aiortc WHEP viewer watches the session. With a P-256
certificate (FFmpeg's ``cert_file``/``key_file``) ≥ 90 % of its frames come back processed; with its
own certificate (GnuTLS: ECDSA P-224, which our OpenSSL refuses in TLS) the session fails and every
place that reports it — the log, ``GET``/``DELETE`` on the WHIP resource, the metric — names the curve
and the fix. With a bearer token (FFmpeg's ``authorization``) against the engine, without one through
the gateway. Waits are for events (a line from the publisher, a frame), bounded, never sleeps.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import sys
import time
from pathlib import Path

import aiortc
import httpx
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ditstream.engine.null import null_runner
from serverkit import KINDS, serve
from whip_ffmpeg import level

PUBLISHER = str(Path(__file__).with_name("whip_ffmpeg.py"))
FRAMES = 150  # 5 s at 30 fps
TOKEN = "k-whip-0123456789"
TIMEOUT = 30.0


def p256_pair(tmp: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate and key (PEM), as ``openssl req -x509 -newkey ec`` makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whip")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(params=KINDS)
def ffmpeg_server(request):
    """``serve`` with an API key (FFmpeg sends it as a bearer token), and a gateway without one."""
    token = TOKEN if request.param == "engine" else None
    settings = {"api_keys": [token]} if token else {}
    with serve(request, "null_fleet", null_runner, model="null", default_width=64, default_height=64,
               max_streams=2, **settings) as srv:
        yield srv, token


class Publisher:
    """``tests/whip_ffmpeg.py`` as a child process, driven line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, *args: str) -> Publisher:
        proc = await asyncio.create_subprocess_exec(sys.executable, PUBLISHER, url + "/v1/whip", *args,
                                                    stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def line(self) -> str:
        assert self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)).decode().strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def finish(self) -> tuple[int, str]:
        _, err = await asyncio.wait_for(self.proc.communicate(), TIMEOUT)
        return self.proc.returncode or 0, err.decode(errors="replace")


class Viewer:
    """A WHEP viewer: the mean level of each frame it receives."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.levels: list[float] = []
        self.connected = asyncio.Event()
        self.pc.on("track", lambda track: asyncio.ensure_future(self._read(track)))
        self.pc.on("connectionstatechange",
                   lambda: self.connected.set() if self.pc.connectionState == "connected" else None)

    async def _read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except aiortc.mediastreams.MediaStreamError:
                return
            self.levels.append(float(frame.to_ndarray(format="rgb24").mean()))

    async def watch(self, client: httpx.AsyncClient, session: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        r = await client.post(f"/v1/whep/{session}", content=self.pc.localDescription.sdp,
                              headers={"Content-Type": "application/sdp"})
        assert r.status_code == 201, r.text
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        await asyncio.wait_for(self.connected.wait(), TIMEOUT)


def _sessions(srv) -> dict:
    return srv.app.state.ditstream.webrtc


async def _status_after(client: httpx.AsyncClient, session: str, state: str) -> dict:
    """The WHIP resource's status once it has left ``state`` (bounded). FFmpeg says "connected" when
    its own end of DTLS is done; ours, the client end here, is done one flight later (it must still
    read FFmpeg's Finished), so a GET right then may still say "connecting"."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = (await client.get(f"/v1/whip/{session}")).json()
        if status.get("state") != state or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.02)


def test_ffmpeg_publishes_with_a_p256_certificate(ffmpeg_server, tmp_path, caplog):
    srv, token = ffmpeg_server
    caplog.set_level(logging.DEBUG, logger="aiortc.rtcdtlstransport")
    cert, key = p256_pair(tmp_path)
    auth = ["--token", token] if token else []

    async def main() -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT, headers=headers) as client:
            pub = await Publisher.start(srv.url, "--cert", str(cert), "--key", str(key), "--frames",
                                        str(FRAMES), *auth)
            assert await pub.line() == "connected", await pub.finish()
            # FFmpeg answered our first ClientHello (webrtc_dtls.repeat_first_flight): no 1 s retransmit
            timeouts = [r for r in caplog.records if "handling timeout" in r.getMessage()]
            assert not timeouts, "aiortc had to retransmit its ClientHello (1 s before the first frame)"
            (session,) = _sessions(srv)
            status = await _status_after(client, session, "connecting")
            assert status == {"session": session, "state": "connected", "viewers": 0, "failure": None}, status
            viewer = Viewer()
            await viewer.watch(client, session)
            before = len(viewer.levels)
            pub.go()
            assert await pub.line() == f"sent {FRAMES}"
            code, err = await pub.finish()
            assert code == 0, err
            got = viewer.levels[before:]
            assert len(got) >= 0.9 * FRAMES, f"{len(got)} of {FRAMES} frames came back"
            # the frames are FFmpeg's: the grey ramp it sent, last frame last (H.264, VP8: a few levels)
            assert abs(got[-1] - level(FRAMES)) < 8, (got[-1], level(FRAMES))
            assert abs(got[0] - level(1)) < 16, (got[0], level(1))  # (or FFmpeg's frame 0, if late)
            deadline = time.monotonic() + TIMEOUT
            while _sessions(srv) and time.monotonic() < deadline:  # FFmpeg's DELETE ends it
                await asyncio.sleep(0.05)
            assert not _sessions(srv)
            await viewer.pc.close()

    asyncio.run(main())


def test_ffmpeg_default_certificate_fails_with_the_reason_and_the_fix(ffmpeg_server, caplog):
    srv, token = ffmpeg_server
    caplog.set_level(logging.WARNING, logger="ditstream.server.live.webrtc_session")
    auth = ["--token", token] if token else []
    metrics = srv.app.state.ditstream.metrics

    async def main() -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT, headers=headers) as client:
            pub = await Publisher.start(srv.url, *auth)
            line = await pub.line()
            assert line.startswith("error:"), line
            code, err = await pub.finish()
            assert code == 1 and "DTLS session failed" in err, err  # FFmpeg's own log line
            failed = [r.getMessage() for r in caplog.records if "DTLS failed" in r.getMessage()]
            assert failed, "the failure is logged"
            session = failed[0].split()[2].rstrip(":")
            for message in (failed[0], (await client.get(f"/v1/whip/{session}")).json()["error"]["message"],
                            (await client.delete(f"/v1/whip/{session}")).json()["error"]["message"]):
                for words in ("DTLS failed", "secp224r1", "wrong curve", "P-256", "-cert_file", "-key_file"):
                    assert words in message, (words, message)
            assert metrics.webrtc_dtls_failures.labels("certificate_curve")._value.get() == 1
            assert not _sessions(srv) and srv.app.state.ditstream.admission.streams.in_use == 0

    asyncio.run(main())
