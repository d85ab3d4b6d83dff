"""A loopback TCP proxy for tests that stand in for a load balancer or a network that comes up.

``TcpProxy`` listens on 127.0.0.1 from the start and forwards each new connection to the port
``target`` names at that moment; with ``target`` ``None`` it closes new connections at once (a
client sees the peer hang up: a connection error). Connections already forwarded stay where they
are when ``target`` changes, as with a Kubernetes Service dropping an endpoint that is not ready.
Threads, so that it serves sync and async clients alike, whatever loop they run on.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards connections to ``127.0.0.1:target`` (switch it at any time; ``None``: refuse)."""

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            target = self.target
            try:
                if target is None:
                    raise ConnectionRefusedError
                upstream = socket.create_connection(("127.0.0.1", target))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), name="tcp-proxy-pump", daemon=True).start()

    def close(self) -> None:
        self.server.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends, then end ``dst``'s sending side too."""
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
