"""The engine cache: a frozen build spec, its hash as the key, a sidecar checked on load.

StreamDiffusion's cache hit is ``os.path.exists`` on a path that carries neither the resolution nor
the TensorRT version, so stale or half-written engines get loaded (STYLE.md counter-example). Here
the key hashes everything that makes an engine valid — weights content, component, dtype, the
min/opt/max profile, builder flags, TensorRT version, GPU compute capability — and a hit needs both
the artifact and a sidecar JSON whose spec equals the one asked for and whose recorded size and
digest match the file. Artifacts are written to a temporary name and ``os.replace``-d; the sidecar is
written last, so a crash at any point leaves nothing that passes ``lookup``.

Several workers may share one cache volume: ``get_or_create`` takes an exclusive lock per key
(``fcntl.flock`` on ``.locks/<key>.lock``), looks again once it holds it, and only then exports or
builds, so two processes asking for the same entry at once build it once and the second loads it.
Every temporary name is unique (``mkstemp``), never a fixed ``.tmp`` two writers would share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Bump when the layout of specs or artifacts changes; old entries then simply miss.
CACHE_FORMAT = 2
SIDECAR_SUFFIX = ".json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ditstream`` or ``~/.cache/ditstream`` (the compose file mounts a volume here)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ditstream"


Range = tuple[int, int, int]

#: The profile built when none is asked for (``build-engine`` and the backends alike, through
#: ``specs.build_profile``): any size from 256² to 1024² (opt 512²), batch 1 to 8.
DEFAULT_RESOLUTIONS: tuple[tuple[int, int], ...] = ((512, 512), (256, 256), (1024, 1024))
DEFAULT_BATCHES: tuple[int, ...] = (1, 8)


@dataclass(frozen=True)
class BuildProfile:
    """min/opt/max of batch and pixel height/width (and prompt length for the transformer)."""

    batch: Range = (1, 1, 4)
    height: Range = (512, 512, 512)
    width: Range = (512, 512, 512)
    seq_len: Range = (300, 300, 300)

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "seq_len"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"profile {name} must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")

    @classmethod
    def from_request(cls, resolutions: Iterable[tuple[int, int]], batch_sizes: Iterable[int], *,
                     seq_len: int = 300) -> BuildProfile:
        """Cover every ``(width, height)`` and batch size asked for; opt = the first of each.

        StreamDiffusion's single fixed 512² profile is its most-reported bug; building the profile from
        what the operator asks for (and failing loudly outside it) is the fix.
        """
        res = [(int(w), int(h)) for w, h in resolutions]
        bs = [int(b) for b in batch_sizes]
        if not res or not bs:
            raise ValueError("at least one resolution and one batch size are needed")
        ws, hs = [w for w, _ in res], [h for _, h in res]
        return cls(batch=(min(bs), bs[0], max(bs)), height=(min(hs), res[0][1], max(hs)),
                   width=(min(ws), res[0][0], max(ws)), seq_len=(seq_len, seq_len, seq_len))

    def covers(self, batch: int, height: int, width: int, seq_len: int | None = None) -> bool:
        ok = (self.batch[0] <= batch <= self.batch[2] and self.height[0] <= height <= self.height[2]
              and self.width[0] <= width <= self.width[2])
        if seq_len is not None:
            ok = ok and self.seq_len[0] <= seq_len <= self.seq_len[2]
        return ok

    def describe(self) -> str:
        def r(v: Range) -> str:
            return f"{v[0]}/{v[1]}/{v[2]}"
        return (f"batch {r(self.batch)}, height {r(self.height)}, width {r(self.width)}, "
                f"seq {r(self.seq_len)} (min/opt/max)")


@dataclass(frozen=True)
class BuildSpec:
    """Everything that decides whether a cached artifact may be reused."""

    weights_hash: str
    component: str
    dtype: str
    profile: BuildProfile
    kind: str = "tensorrt"  # "tensorrt" engine or "onnx" export
    flags: tuple[tuple[str, Any], ...] = ()
    trt_version: str = ""
    compute_capability: str = ""
    gpu: str = ""  # the device name: one SM version covers GPUs whose best tactics differ
    trt_flavour: str = ""  # the TensorRT wheel's CUDA major ("cu12", "cu13")
    opset: int = 17
    format: int = CACHE_FORMAT
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"] = asdict(self.profile)
        d["flags"] = [list(f) for f in self.flags]
        d["extra"] = [list(f) for f in self.extra]
        return json.loads(json.dumps(d))  # tuples -> lists, so it equals what a sidecar reads back

    def key(self) -> str:
        """Hex digest of the canonical JSON of this spec (24 hex chars = 96 bits)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def filename(self, suffix: str) -> str:
        """Readable prefix + key, e.g. ``transformer-fp16-3f2a….plan``."""
        return f"{self.component}-{self.dtype}-{self.key()}{suffix}"


def weights_hash(module: Any) -> str:
    """Content hash of a module's class, config and every tensor in its state dict.

    Hashing tensors (not file paths or mtimes) means a re-saved or re-downloaded copy of the same
    weights hits the cache and any change to a single value misses it. bf16 tensors are hashed by
    their bytes (numpy has no bf16).
    """
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        cfg = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).cpu().numpy())  # buffer protocol: no extra copy
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EngineCache:
    """A folder of ``<component>-<dtype>-<key><suffix>`` artifacts, each with a ``.json`` sidecar."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir() / "engines"

    def path(self, spec: BuildSpec, suffix: str = ".plan") -> Path:
        return self.root / spec.filename(suffix)

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_name(path.name + SIDECAR_SUFFIX)

    def lookup(self, spec: BuildSpec, suffix: str = ".plan", *, verify_digest: bool = True) -> Path | None:
        """The artifact for ``spec`` if it exists and its sidecar vouches for it, else ``None``."""
        path = self.path(spec, suffix)
        side = self.sidecar(path)
        if not path.exists() or not side.is_file():
            return None
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache sidecar %s: %s", side, exc)
            return None
        if meta.get("spec") != spec.to_dict():
            logger.warning("cache entry %s was built for another spec; rebuilding", path.name)
            return None
        if path.is_file():
            if meta.get("size") != path.stat().st_size:
                logger.warning("cache entry %s has the wrong size (truncated?); rebuilding", path.name)
                return None
            if verify_digest and meta.get("sha256") != file_digest(path):
                logger.warning("cache entry %s does not match its recorded digest; rebuilding", path.name)
                return None
        return path

    def store_bytes(self, spec: BuildSpec, data: bytes, suffix: str = ".plan",
                    info: dict[str, Any] | None = None) -> Path:
        """Write ``data`` atomically, then its sidecar."""
        return self.store_with(spec, lambda tmp: Path(tmp).write_bytes(data), suffix, info)

    def store_with(self, spec: BuildSpec, writer: Callable[[Path], Any], suffix: str = ".plan",
                   info: dict[str, Any] | None = None) -> Path:
        """Call ``writer(tmp_path)`` to produce the artifact; publish it only if it returns normally.

        ``writer`` may create a file or a folder at ``tmp_path``. On any exception the temporary is
        removed and nothing at the final path changes.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(spec, suffix)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        tmp = Path(tmp_name)
        tmp.unlink()  # the writer creates it (file or folder)
        try:
            writer(tmp)
            if not tmp.exists():
                raise RuntimeError(f"writer produced nothing at {tmp}")
            if tmp.is_file():
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            # Remove the old sidecar first: from here until the new one lands, no entry is valid.
            with contextlib.suppress(FileNotFoundError):
                self.sidecar(path).unlink()
            _replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        meta: dict[str, Any] = {"spec": spec.to_dict(), "key": spec.key(), **(info or {})}
        if path.is_file():
            meta["size"] = path.stat().st_size
            meta["sha256"] = file_digest(path)
        side = self.sidecar(path)
        write_atomic(side, json.dumps(meta, indent=2, sort_keys=True).encode())
        logger.info("cached %s", path)
        return path

    @contextlib.contextmanager
    def lock(self, name: str, *, poll_s: float = 0.5) -> Iterator[None]:
        """Hold the exclusive inter-process lock ``name`` (a key or a file name) of this cache folder.

        ``fcntl.flock`` on ``<root>/.locks/<name>.lock``: released by the kernel if the holder dies, and
        exclusive between threads too (each call opens its own file description). Waits as long as it
        takes (an engine build can take many minutes), logging once that it waits.
        """
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"{name}.lock"
        try:
            import fcntl
        except ImportError:  # not POSIX: filelock (a dependency of torch) does the same
            from filelock import FileLock

            with FileLock(str(path)):
                yield
            return
        with open(path, "a+b") as fh:
            waited = False
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        logger.info("waiting for another process that holds the cache lock %s", path)
                        waited = True
                    time.sleep(poll_s)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def get_or_create(self, spec: BuildSpec, writer: Callable[[Path], Any], suffix: str = ".plan",
                      info: dict[str, Any] | None = None) -> tuple[Path, bool]:
        """``(path, created)``: the entry for ``spec``, made by ``writer`` (``store_with``) unless present.

        Holds ``lock(spec.key())`` from the second lookup to the sidecar, so concurrent callers for
        one key (threads or processes sharing the folder) create it once; the others then hit.
        """
        hit = self.lookup(spec, suffix)
        if hit is not None:
            return hit, False
        with self.lock(spec.key()):
            hit = self.lookup(spec, suffix)
            if hit is not None:
                logger.info("cache entry %s was made by another process meanwhile", hit.name)
                return hit, False
            return self.store_with(spec, writer, suffix, info), True

    def entries(self) -> list[dict[str, Any]]:
        """Sidecars of every complete entry (for ``build-engine --list``)."""
        out = []
        for side in sorted(self.root.glob(f"*{SIDECAR_SUFFIX}")):
            with contextlib.suppress(OSError, ValueError):
                out.append({"path": str(side)[: -len(SIDECAR_SUFFIX)], **json.loads(side.read_text())})
        return out


def unique_name(path: Path, tag: str = "tmp") -> Path:
    """A sibling of ``path`` no other process or thread will pick (pid + random), hidden by its dot."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a unique temporary beside ``path``, fsync it, then ``os.replace`` it."""
    tmp = unique_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        old = unique_name(dst, "old")
        os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
