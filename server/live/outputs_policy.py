"""What an output may be: the operator's policy (``--outputs``, ``--output-hosts``, ``--record-dir``)
and the checks a requested URL passes before anything is opened (``docs/deploy.md``, "Outputs").

An output makes the server open a connection or a file on a client's word, so everything is refused
unless the operator allowed it: the kind (``rtmp`` covers ``rtmp://`` and ``rtmps://``; ``srt``;
``file``), the host (every address it resolves to must be public, or inside an address or range the
operator listed; with host patterns listed, the host must match one), the file name (a plain
``NAME.mp4`` in the record folder, created here exclusively: never a path, never an overwrite).

Secrets ride in these URLs (a platform's stream key is the RTMP path; SRT's ``passphrase`` and
``streamid``), so what is shown — in listings, logs and error messages — is ``OutputTarget.shown``,
with them masked.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from ditstream.engine.errors import ValidationError
from ditstream.server.errors import InvalidOutputError, OutputExistsError, OutputRefusedError

if TYPE_CHECKING:
    from ditstream.server.settings import Settings

#: ``--outputs`` names → the URL schemes each allows.
KINDS: dict[str, tuple[str, ...]] = {"rtmp": ("rtmp", "rtmps"), "srt": ("srt",), "file": ("file",)}
#: URL scheme → (kind, container format PyAV writes).
SCHEMES: dict[str, tuple[str, str]] = {"rtmp": ("rtmp", "flv"), "rtmps": ("rtmp", "flv"), "srt": ("srt", "mpegts"),
                                       "file": ("file", "mp4")}
#: SRT URL options a client may set; ``mode`` only as ``caller`` (a listener would open a port here).
SRT_OPTIONS = frozenset({"streamid", "passphrase", "pbkeylen", "latency", "mode"})
SRT_SECRETS = frozenset({"streamid", "passphrase"})
#: ``file:NAME.mp4``: a plain name, nothing that could climb out of the record folder.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.mp4")
_HOST_GLOB = re.compile(r"[A-Za-z0-9*?.-]+")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class HostPatterns:
    """``--output-hosts``: host-name globs (``*.twitch.tv``) and addresses or ranges (``10.0.0.0/8``).

    A glob allows a name, never a private address by itself: only a listed address or range lets an
    output reach loopback, link-local or private space (a name could be pointed there by its DNS).
    """

    names: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, patterns: list[str]) -> HostPatterns:
        names: list[str] = []
        networks: list[Network] = []
        for raw in patterns:
            p = raw.strip().strip("[]")
            try:
                networks.append(ipaddress.ip_network(p, strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_GLOB.fullmatch(p):
                raise ValidationError(f"--output-hosts: {raw!r} is neither an address, a CIDR range nor a host "
                                      f"name pattern like '*.example.com'", field="output_hosts")
            names.append(p.lower())
        return cls(tuple(names), tuple(networks))

    @property
    def empty(self) -> bool:
        return not self.names and not self.networks

    def listed(self, address: Address) -> bool:
        return any(address in net for net in self.networks)

    def name_matches(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host.lower(), glob) for glob in self.names)


@dataclass(frozen=True)
class OutputTarget:
    """A requested output, checked: what to open (``url``, PyAV ``format``) and how to show it."""

    kind: str  # rtmp | srt | file
    url: str  # what PyAV opens (a file output: the absolute path in the record folder)
    format: str  # flv | mpegts | mp4
    shown: str  # the URL with its secrets masked: listings, logs, errors
    host: str | None = None
    port: int | None = None

    def mask(self, text: str) -> str:
        """``text`` (an error message that may quote the URL) with the URL replaced by ``shown``."""
        return text.replace(self.url, self.shown)


def check_settings(settings: Settings) -> None:
    """Start-up checks of the outputs' settings (``Settings`` calls this once); raises ``ValidationError``."""
    unknown = [k for k in settings.outputs if k not in KINDS]
    if unknown:
        raise ValidationError(f"--outputs: unknown kind(s) {unknown}; the kinds are {sorted(KINDS)}", field="outputs")
    if settings.redis_url:
        raise ValidationError("--outputs runs in the all-in-one server only: with --redis a session lives on a "
                              "worker and moves between workers (docs/deploy.md, 'Outputs')", field="outputs")
    if "file" in settings.outputs:
        if not settings.record_dir:
            raise ValidationError("--outputs file needs --record-dir (the folder recordings go to)", field="record_dir")
        if not Path(settings.record_dir).is_dir():
            raise ValidationError(f"--record-dir {settings.record_dir!r} is not a folder", field="record_dir")
    HostPatterns.parse(settings.output_hosts)
    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise ValidationError("--outputs encodes with PyAV, which is not installed: pip install 'ditstream[outputs]'",
                              field="outputs") from exc
    from ditstream.server.live.outputs_mux import check_encoder, missing_protocols

    check_encoder(settings.output_encoder)
    missing = missing_protocols([s for k in settings.outputs for s in KINDS[k] if s != "file"])
    if missing:
        raise ValidationError(f"--outputs: this PyAV build's FFmpeg has no {'/'.join(missing)} protocol, so those "
                              f"outputs could never connect; leave them out of --outputs", field="outputs")


def parse_target(url: str, settings: Settings) -> OutputTarget:
    """A requested URL → ``OutputTarget``, without touching the network (the host is checked by
    ``check_host``). Unknown shapes are 422 (``InvalidOutputError``), kinds not allowed 403."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidOutputError("the output URL holds whitespace or control characters", field="url")
    scheme = url.partition(":")[0].lower()
    if scheme not in SCHEMES:
        raise InvalidOutputError(f"unsupported output {scheme or url!r:.40}: use rtmp://, rtmps://, srt:// or "
                                 f"file:NAME.mp4", field="url")
    kind, fmt = SCHEMES[scheme]
    if kind not in settings.outputs:
        raise OutputRefusedError(f"{scheme} outputs are not allowed on this server (allowed: "
                                 f"{', '.join(settings.outputs)}; the operator's --outputs)", field="url")
    if kind == "file":
        return _file_target(url[len("file:"):], Path(str(settings.record_dir)))
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidOutputError(f"bad port in the output URL: {exc}", field="url") from exc
    host = parts.hostname
    if not host or port == 0:
        raise InvalidOutputError(f"the output URL needs a host{' and a port' if kind == 'srt' else ''}: "
                                 f"{scheme}://HOST[:PORT]/...", field="url")
    if kind == "srt":
        if port is None:
            raise InvalidOutputError("srt:// URLs need a port: srt://HOST:PORT", field="url")
        return OutputTarget(kind, url, fmt, _srt_shown(parts.query, scheme, host, port), host, port)
    return OutputTarget(kind, url, fmt, _rtmp_shown(parts.path, scheme, host, port), host, port or 1935)


def _rtmp_shown(path: str, scheme: str, host: str, port: int | None) -> str:
    """``rtmp://host/app/STREAM_KEY`` → ``rtmp://host/app/***``: the key is whatever follows the app."""
    app, _, rest = path.lstrip("/").partition("/")
    where = f"{host}:{port}" if port else host
    return f"{scheme}://{where}/{app}" + ("/***" if rest else "")


def _srt_shown(query: str, scheme: str, host: str, port: int) -> str:
    options = parse_qsl(query, keep_blank_values=True)
    for key, value in options:
        if key not in SRT_OPTIONS:
            raise InvalidOutputError(f"SRT option {key!r} is not allowed; allowed: {sorted(SRT_OPTIONS)}", field="url")
        if key == "mode" and value != "caller":
            raise InvalidOutputError(f"SRT mode {value!r} is not allowed: the server only calls out (mode=caller)",
                                     field="url")
    shown = "&".join(f"{k}={'***' if k in SRT_SECRETS else v}" for k, v in options)
    return f"{scheme}://{host}:{port}" + (f"?{shown}" if shown else "")


def _file_target(name: str, folder: Path) -> OutputTarget:
    if not FILE_NAME.fullmatch(name) or ".." in name:
        raise InvalidOutputError(f"file outputs are file:NAME.mp4, a plain name (letters, digits, '.', '_', '-'; "
                                 f"no folders), got {name!r:.80}", field="url")
    return OutputTarget("file", str(folder.resolve() / name), "mp4", f"file:{name}")


def check_host(target: OutputTarget, patterns: HostPatterns) -> None:
    """Resolve the host and refuse it unless allowed (blocking: call it off the event loop).

    Allowed: listed by name or address when patterns are given, and every address public or inside
    a listed range. The check is on what the name resolves to now; FFmpeg resolves it again when it
    connects, so list the hosts (``--output-hosts``) wherever names could be re-pointed.
    """
    if target.host is None:
        return
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidOutputError(f"cannot resolve the output host {target.host!r}: {exc.strerror or exc}",
                                 field="url") from exc
    addresses = {_unmapped(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos}
    for address in sorted(addresses, key=str):
        if not _public(address) and not patterns.listed(address):
            raise OutputRefusedError(f"host {target.host!r} is {address}, a {_space(address)} address: refused "
                                     f"unless the operator lists it in --output-hosts", field="url")
    if not patterns.empty and not patterns.name_matches(target.host) and not all(
            patterns.listed(a) for a in addresses):
        raise OutputRefusedError(f"host {target.host!r} is not in this server's --output-hosts", field="url")


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _public(address: Address) -> bool:
    return address.is_global and not address.is_multicast


def _space(address: Address) -> str:
    """The kind of non-public address, for the refusal's message."""
    kinds = [("loopback", address.is_loopback), ("link-local", address.is_link_local),
             ("private", address.is_private), ("multicast", address.is_multicast),
             ("unspecified", address.is_unspecified), ("reserved", address.is_reserved)]
    return next((name for name, yes in kinds if yes), "non-public")


def reserve_file(target: OutputTarget) -> None:
    """Create the recording's file now, exclusively: an existing name is refused (409), never overwritten."""
    try:
        fd = os.open(target.url, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as exc:
        raise OutputExistsError(f"{target.shown} exists in the record folder; recordings are never overwritten: "
                                f"pick another name", field="url") from exc
    os.close(fd)
