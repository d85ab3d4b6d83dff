"""A publisher's failed DTLS handshake is reported with its cause (issue 27), without FFmpeg too.

An aiortc publisher given an ECDSA P-224 certificate (what FFmpeg's GnuTLS build makes) is the DTLS
server; its own OpenSSL refuses to use that key and answers our ClientHello with a fatal
handshake_failure alert, which the server reports as the session's end reason (log, ``GET``, metric).
This guards ``server/live/webrtc_dtls.py``'s reach into aiortc and pyOpenSSL (the DTLS transport's
``_ssl``, where the info callback goes) without FFmpeg; the "wrong curve" case — our side refusing the
publisher's curve, needing a GnuTLS peer — is ``test_webrtc_ffmpeg.py``'s. (The publisher's
certificate is set through aiortc's private attribute: aiortc has no API for one.)
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdtlstransport import RTCCertificate, generate_certificate
from cryptography.hazmat.primitives.asymmetric import ec
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app
from ditstream.server.settings import Settings
from rtckit import Source

from ditstream.bench.harness import ServerThread

TIMEOUT = 30.0


def p224_peer() -> RTCPeerConnection:
    pc = RTCPeerConnection()
    key = ec.generate_private_key(ec.SECP224R1())
    pc._RTCPeerConnection__certificates = [RTCCertificate(key=key, cert=generate_certificate(key))]
    pc.addTrack(Source(np.zeros((64, 64, 3), np.uint8)))
    return pc


def test_a_publisher_that_refuses_the_handshake_ends_its_session_with_the_alert(caplog):
    caplog.set_level(logging.WARNING, logger="ditstream.server.live.webrtc_session")
    app = create_app(Settings(model="null", default_width=64, default_height=64), null_runner())

    async def main(srv: ServerThread) -> None:
        pc = p224_peer()
        failed = asyncio.Event()
        pc.on("connectionstatechange", lambda: failed.set() if pc.connectionState == "failed" else None)
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
            r = await client.post("/v1/whip", content=pc.localDescription.sdp,
                                  headers={"Content-Type": "application/sdp"})
            assert r.status_code == 201, r.text
            await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
            await asyncio.wait_for(failed.wait(), TIMEOUT)
            session = r.headers["location"].rsplit("/", 1)[1]
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while session in srv.app.state.ditstream.webrtc:  # the server ends it on its side
                assert asyncio.get_running_loop().time() < deadline, "the session outlived its failed peer"
                await asyncio.sleep(0.02)
            message = (await client.get(r.headers["location"])).json()["error"]["message"]
        await pc.close()
        logged = [m.getMessage() for m in caplog.records if "DTLS failed" in m.getMessage()]
        assert logged and session in logged[0], caplog.text
        for text in (logged[0], message):
            assert "DTLS failed: alert handshake_failure (received from the peer)" in text, text
        failures = srv.app.state.ditstream.metrics.webrtc_dtls_failures
        assert failures.labels("handshake")._value.get() == 1
        assert failures.labels("certificate_curve")._value.get() == 0

    with ServerThread(app) as srv:
        asyncio.run(main(srv))


def test_ended_sessions_keep_the_newest_reasons_only():
    from ditstream.server.live.webrtc_ended import LIMIT, EndedSessions

    ended = EndedSessions()
    for i in range(LIMIT + 5):
        ended.record(f"s{i}", f"reason {i}")
    assert len(ended.reasons) == LIMIT
    assert ended.reason("s0") is None and ended.reason(f"s{LIMIT + 4}") == f"reason {LIMIT + 4}"
