"""ICE for a server behind a firewall or in a container: a fixed UDP port range and a public address.

aiortc gathers its host candidates through aioice, which binds a random port on every interface and
announces the interface's own address. Neither works behind a firewall that opens a few ports, nor in
a container whose address the client cannot reach. ``install(ports, public_host)`` replaces the
``Connection`` aiortc builds its ICE transports from (process-wide; a server has one ICE setting) by
one that binds its host candidates within ``ports`` and announces ``public_host`` in their place
(the 1:1 NAT mapping other media servers call ``nat1to1``). With neither set it changes nothing.
It also expires a peer's consent (RFC 7675: no answer to the checks) after ``consent_timeout``
seconds instead of aioice's fixed six misses at ~5 s each (30–36 s), so a peer that vanishes without
a goodbye (a closed laptop, a lost network) frees its session in well under 30 s.
Imported only when the ``webrtc`` extra is installed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import random
import socket
import time

import aioice
import aiortc.rtcicetransport
from aioice import stun
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.ice import StunProtocol

logger = logging.getLogger(__name__)

#: aioice's receive buffer for its sockets (its own default for host candidates).
_RCVBUF = 1024 * 1024


class RangedConnection(aioice.Connection):
    """An aioice ``Connection`` whose host candidates bind in ``ports`` and announce ``public_host``."""

    ports: tuple[int, int] | None = None
    public_host: str | None = None
    consent_timeout: float = 20.0
    _next = itertools.count()

    async def query_consent(self) -> None:
        """Consent freshness (RFC 7675): a check every ~timeout/6 s; none answered for ``consent_timeout``
        → the connection closes (aiortc then reports the peer ``failed`` and the session ends).
        Expiry comes at most ``consent_timeout`` × 1.2 + one check's timeout after the last answer."""
        assert self.remote_password is not None
        interval, last_ok = self.consent_timeout / 6, time.monotonic()
        while True:
            await asyncio.sleep(interval * (0.8 + 0.4 * random.random()))
            for pair in self._nominated.values():
                try:
                    await pair.protocol.request(self.build_request(pair, nominate=False), pair.remote_addr,
                                                integrity_key=self.remote_password.encode("utf8"),
                                                retransmissions=0)
                    last_ok = time.monotonic()
                except stun.TransactionError:
                    pass
            if time.monotonic() - last_ok >= self.consent_timeout:
                logger.info("ICE consent expired: no answer for %.1f s", time.monotonic() - last_ok)
                self._query_consent_task = None  # close() must not cancel this task, which runs it
                await self.close()
                return

    async def get_component_candidates(self, component: int, addresses: list[str],
                                       timeout: int = 5) -> list[Candidate]:
        if self.ports is None:
            candidates = await super().get_component_candidates(component, addresses, timeout)
        else:
            candidates = await self._ranged_candidates(component, addresses)
        if self.public_host:
            for c in candidates:
                if c.type == "host" and _version(c.host) == _version(self.public_host):
                    c.host = self.public_host  # also the protocol's local_candidate: the same object
        return candidates

    async def _ranged_candidates(self, component: int, addresses: list[str]) -> list[Candidate]:
        """Host candidates only (no STUN/TURN: with a fixed range the public address is configured)."""
        assert self.ports is not None
        lo, hi = self.ports
        loop = asyncio.get_running_loop()
        candidates = []
        for address in addresses:
            start = next(self._next) % (hi - lo + 1)  # spread sessions over the range
            for i in range(hi - lo + 1):
                port = lo + (start + i) % (hi - lo + 1)
                try:
                    transport, protocol = await loop.create_datagram_endpoint(
                        lambda: StunProtocol(self), local_addr=(address, port))
                    break
                except OSError:
                    continue
            else:
                logger.warning("no free UDP port in %d-%d on %s: no ICE candidate there", lo, hi, address)
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            host, bound = transport.get_extra_info("sockname")[:2]
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", host), component=component, transport="udp",
                priority=candidate_priority(component, "host"), host=host, port=bound, type="host")
            self._protocols.append(protocol)
            candidates.append(protocol.local_candidate)
        return candidates


def _version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def install(ports: tuple[int, int] | None, public_host: str | None, consent_timeout: float = 20.0) -> None:
    """Make every ICE transport aiortc builds from now on use these settings."""
    RangedConnection.ports = ports
    RangedConnection.public_host = public_host
    RangedConnection.consent_timeout = consent_timeout
    aiortc.rtcicetransport.Connection = RangedConnection  # type: ignore[attr-defined, misc]
