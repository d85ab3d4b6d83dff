"""Why a peer's DTLS handshake failed, in words a publisher's operator can act on.

aiortc (1.16) turns a failed handshake into the DTLS transport's ``failed`` state and a debug line
"DTLS handshake failed (error [])": the TLS library's error was raised by an earlier ``recv`` and
dropped there, so the list is empty by the time the handshake reports. The reason exists only while
OpenSSL handles the failing record, so ``watch_dtls`` listens there: when a transport enters
``connecting`` (aiortc's public ``statechange`` event, emitted once its SSL connection exists and
before the first handshake step), it sets pyOpenSSL's public per-connection info callback on it, and
on a fatal alert — ours or the peer's — records the alert and the library's pending reason
("wrong curve", ...). When the transport then reports ``failed``, ``on_failure`` gets one sentence.

The case seen in the field has its own message: FFmpeg built with GnuTLS (PyAV's wheels, FFmpeg 8.1)
makes an ECDSA P-224 certificate for WHIP; our OpenSSL no longer offers P-224 in TLS, so the
handshake cannot succeed, and the fix is on the publisher's side (a P-256 certificate, FFmpeg's
``-cert_file``/``-key_file``). Re-enabling P-224 here would turn a deprecated curve back on for the
whole process: not done.

Also here, because it is the same moment: when the server is the DTLS client (FFmpeg's offers say
``a=setup:passive``), ``repeat_first_flight`` sends the first ClientHello twice, which FFmpeg's muxer
needs to answer it without a 1 s retransmission (see there; docs/benchmarks.md, "WHIP: POST to
first frame").

Three privates are used, each guarded by a test that fails if it moves (instead of the reason
silently going back to "error []" or the second coming back): the DTLS transport's ``_ssl``
connection (``tests/test_webrtc_dtls.py``), pyOpenSSL's ``_util.lib`` error-queue peek ("wrong curve"
in ``tests/test_webrtc_ffmpeg.py``) and the ICE transport's ``_send`` (no retransmission, same file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiortc import RTCDtlsTransport
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

logger = logging.getLogger(__name__)

#: What FFmpeg's WHIP muxer needs to publish here (docs/protocol.md, "Publishers").
P256_FIX = ("the publisher must use a P-256 (prime256v1) ECDSA certificate — FFmpeg's WHIP muxer: "
            "-cert_file cert.pem -key_file key.pem (make them with: openssl req -x509 -newkey ec "
            "-pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 -subj /CN=whip "
            "-keyout key.pem -out cert.pem)")
#: Curves our TLS library takes in a DTLS handshake (OpenSSL's default groups for ECDSA keys).
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
#: TLS alert descriptions (RFC 8446 §6, RFC 5246 §7.2), for the ones a handshake ends with.
ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
          40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
          44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
          47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied", 50: "decode_error",
          51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
          86: "inappropriate_fallback", 90: "user_canceled", 109: "missing_extension",
          110: "unsupported_extension", 112: "unrecognized_name", 120: "no_application_protocol"}
_FATAL = 2
#: A DTLS record of content type handshake (22) starts with this byte.
HANDSHAKE_RECORD = b"\x16"


def _pending_reasons() -> list[str]:
    """The reasons on this thread's OpenSSL error queue, left in place (peeked, not popped)."""
    try:
        from OpenSSL._util import ffi, lib
    except ImportError:
        logger.warning("pyOpenSSL has no _util.lib: the TLS library's reason is not recorded")
        return []
    code = lib.ERR_peek_error()
    text = lib.ERR_reason_error_string(code) if code else ffi.NULL
    return [ffi.string(text).decode()] if text != ffi.NULL else []


def repeat_first_flight(transport: RTCDtlsTransport) -> None:
    """Send our first DTLS datagram (the ClientHello) twice.

    FFmpeg's WHIP muxer (8.1) reads the first DTLS datagram on its socket in its ICE loop, sees it is
    DTLS, and only then starts its DTLS server, which reads the socket again: that first ClientHello is
    consumed and lost, and the handshake waits for OpenSSL's first retransmission, 1 s later (aiortc
    exposes no timer setting; pyOpenSSL no ``DTLS_set_timer_cb``). A second copy sent right after is
    what its DTLS server reads. DTLS tolerates duplicated datagrams (RFC 6347 §4.1.2.6, §4.2.4): a
    peer that got the first copy drops or answers the second like a retransmission. Only the first
    handshake datagram is repeated, once. Wraps the ICE transport's private ``_send`` on this instance.
    """
    ice = transport.transport
    try:
        send = ice._send
    except AttributeError:
        logger.warning("aiortc's ICE transport has no _send: FFmpeg publishers wait 1 s for a retransmission")
        return
    sent = False

    async def send_first_twice(data: bytes) -> None:
        nonlocal sent
        await send(data)
        if not sent and data[:1] == HANDSHAKE_RECORD:
            sent = True
            await send(data)

    ice._send = send_first_twice


class DtlsWatch:
    """One DTLS transport's handshake, watched: its alerts and the library's reason for them."""

    def __init__(self, transport: RTCDtlsTransport, on_failure: Callable[[str], None],
                 is_client: Callable[[], bool] = lambda: False) -> None:
        self.transport = transport
        self.on_failure = on_failure
        self.is_client = is_client
        self.alerts: list[str] = []
        self.reasons: list[str] = []
        self.reported = False
        transport.on("statechange", self._on_state)

    def _on_state(self) -> None:
        state = self.transport.state
        if state == "connecting":
            ssl = self._ssl()
            if ssl is None:
                logger.warning("aiortc's DTLS transport has no _ssl connection: failure reasons not recorded")
                return
            ssl.set_info_callback(self._on_info)
            if self.is_client():
                repeat_first_flight(self.transport)
        elif state == "failed" and not self.reported:
            self.reported = True
            self.on_failure(self.reason())

    def _ssl(self) -> SSL.Connection | None:
        """aiortc's private SSL connection of the transport (None if aiortc moved it)."""
        try:
            ssl = self.transport._ssl
        except AttributeError:
            return None
        return ssl if isinstance(ssl, SSL.Connection) else None

    def _on_info(self, conn: SSL.Connection, where: int, value: int) -> None:
        """pyOpenSSL's info callback: on a fatal alert, note it and OpenSSL's reason (still queued)."""
        if not where & SSL.SSL_CB_ALERT or value >> 8 != _FATAL:
            return
        desc = ALERTS.get(value & 0xFF, f"alert {value & 0xFF}")
        side = "sent" if where & SSL.SSL_CB_WRITE else "received from the peer"
        self.alerts.append(f"{desc} ({side})")
        if where & SSL.SSL_CB_WRITE:
            self.reasons.extend(r for r in _pending_reasons() if r not in self.reasons)

    def peer_curve(self) -> str | None:
        """The peer certificate's ECDSA curve, if the handshake got as far as receiving it."""
        ssl = self._ssl()
        cert = ssl.get_peer_certificate(as_cryptography=True) if ssl is not None else None
        key = cert.public_key() if cert is not None else None
        return key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else None

    def reason(self) -> str:
        """One sentence: the library's reason, the alert, and for an unusable curve the fix."""
        curve = self.peer_curve()
        parts = []
        if self.reasons:
            parts.append(", ".join(self.reasons))
        if self.alerts:
            parts.append("alert " + ", ".join(self.alerts))
        if not parts and self.transport.encrypted:
            parts.append("the handshake completed but its result was refused: the peer's certificate does not "
                         "match the SDP's a=fingerprint, or no SRTP profile was agreed")
        text = "; ".join(parts) or "no TLS alert or library error recorded (the peer stopped answering?)"
        if curve is not None and curve not in SUPPORTED_CURVES:
            return (f"the publisher's certificate uses ECDSA {curve}, which this server's TLS library "
                    f"does not accept ({text}); {P256_FIX}")
        return text


def watch_dtls(pc: Any, on_failure: Callable[[str], None]) -> list[DtlsWatch]:
    """Watch every DTLS transport of ``pc`` (call after the remote description is applied)."""
    transports: dict[int, Any] = {}
    for transceiver in pc.getTransceivers():
        for end in (transceiver.receiver, transceiver.sender):
            if end is not None and end.transport is not None:
                transports[id(end.transport)] = end.transport
    if pc.sctp is not None:
        transports[id(pc.sctp.transport)] = pc.sctp.transport
    def is_client() -> bool:  # our answer's a=setup:active: we send the ClientHello
        local = pc.localDescription
        return local is not None and "a=setup:active" in local.sdp

    return [DtlsWatch(t, on_failure, is_client) for t in transports.values()]
