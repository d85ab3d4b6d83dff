"""The STUN/TURN servers a WebRTC client should use, with TURN credentials minted per client.

A TURN relay must not be open to anyone, and its secret must not reach a page. The TURN REST API
scheme (coturn ``use-auth-secret``; draft-uberti-behave-turn-rest) needs no call to the TURN server:
the username is ``<expiry unix time>:<name>`` and the password is base64(HMAC-SHA1(secret,
username)); the TURN server recomputes it and refuses it after the expiry. The same list is served
two ways: as JSON (``GET /v1/webrtc/ice-servers``, for the page, before it builds its peer
connections) and as RFC 9725 ``Link`` headers on the WHIP/WHEP answers (for WHIP clients like OBS).
No aiortc here: the page's route works without the ``webrtc`` extra.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from ditstream.server.settings import Settings

#: The name in a minted username (what the TURN server logs; no user identity is implied).
TURN_USER = "ditstream"


@dataclass(frozen=True)
class IceServer:
    """One entry of ``RTCConfiguration.iceServers``."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"urls": list(self.urls)}
        if self.username is not None:
            d.update(username=self.username, credential=self.credential)
        return d


def turn_credential(secret: str, expires_at: int, name: str = TURN_USER) -> tuple[str, str]:
    """(username, password) valid until ``expires_at`` for a TURN server sharing ``secret``."""
    username = f"{expires_at}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def client_ice_servers(settings: Settings, now: float | None = None) -> tuple[list[IceServer], int | None]:
    """The servers a client should use and when their TURN credentials expire (None: no TURN)."""
    servers = [IceServer(urls=(u,)) for u in settings.webrtc_stun_servers]
    if not settings.webrtc_turn_urls or settings.webrtc_turn_secret is None:
        return servers, None
    expires_at = int(now if now is not None else time.time()) + settings.webrtc_turn_ttl_s
    username, password = turn_credential(settings.webrtc_turn_secret.get_secret_value(), expires_at)
    servers.append(IceServer(urls=tuple(settings.webrtc_turn_urls), username=username, credential=password))
    return servers, expires_at


def link_header(servers: list[IceServer]) -> str | None:
    """The servers as one RFC 9725 ``Link`` header value (one link-value per URL), or None."""
    links = []
    for s in servers:
        for url in s.urls:
            link = f'<{url}>; rel="ice-server"'
            if s.username is not None:
                link += f'; username="{s.username}"; credential="{s.credential}"; credential-type="password"'
            links.append(link)
    return ", ".join(links) or None
