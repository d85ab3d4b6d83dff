"""compose.yaml, the Dockerfiles and the entrypoint, checked without a Docker engine.

Parsed and cross-checked against the code: services and profiles, GPU reservations, volumes that
match where the image keeps weights and engines, healthchecks with start periods long enough for
engine builds, a non-root user, every DITSTREAM_* variable a real setting, and no secret written in.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ditstream.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SECRETISH = re.compile(r"(KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL)", re.I)
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:?-[^}]*)?\}$")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _seconds(value: str | int) -> float:
    """Compose durations: '90s', '15m', '1h30m', '500ms'."""
    if isinstance(value, int | float):
        return float(value)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(num) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (ROOT / "docker" / name).read_text()
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            instr, _, args = buf.partition(" ")
            out.append((instr.upper(), args.strip()))
            buf = ""
    return out


def _env_pairs(args: str) -> list[tuple[str, str]]:
    return [tuple(tok.split("=", 1)) for tok in shlex.split(args) if "=" in tok]  # type: ignore[misc]


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose()


def test_services_and_profiles(compose):
    services = compose["services"]
    assert {"redis", "gateway", "worker", "gateway-cpu", "worker-cpu"} <= set(services)
    assert "profiles" not in services["redis"], "redis runs under every profile"
    assert services["gateway"]["profiles"] == ["gpu"] and services["worker"]["profiles"] == ["gpu"]
    assert services["gateway-cpu"]["profiles"] == ["cpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    for name in ("gateway", "gateway-cpu"):
        assert services[name]["command"][0] == "serve"
        assert any(str(p).endswith(":8000") for p in services[name]["ports"])
    for name, svc in services.items():
        if name == "redis":
            continue
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        env = svc["environment"]
        assert env["DITSTREAM_REDIS_URL"].endswith("redis://redis:6379/0}"), "workers and gateway find redis by name"
    assert "--save" in services["redis"]["command"]


def test_gpu_workers_reserve_a_gpu_and_cpu_ones_do_not(compose):
    services = compose["services"]
    gpu_workers = [n for n, s in services.items() if s.get("command", [""])[0] == "worker" and _gpu_devices(s)]
    assert {"worker", "worker-gpu1"} <= set(gpu_workers)
    for name in gpu_workers:
        (dev,) = _gpu_devices(services[name])
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        assert ("count" in dev) != ("device_ids" in dev), "count and device_ids exclude each other"
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert services[name]["environment"]["DITSTREAM_DEVICE"] == "cuda"
    ids = [_gpu_devices(services[n])[0].get("device_ids") for n in ("worker", "worker-gpu1")]
    assert ids[0] != ids[1], "two GPU workers on one box use different GPUs"
    for name in ("gateway", "gateway-cpu", "worker-cpu", "redis"):
        assert not _gpu_devices(services[name]), f"{name} must not hold a GPU"
    cpu = services["worker-cpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert cpu["environment"]["DITSTREAM_DEVICE"] == "cpu"
    assert "demo" in cpu["environment"]["DITSTREAM_MODEL"], "the CPU profile runs the demo model"


def test_volumes_match_where_the_images_keep_weights_and_engines(compose):
    assert {"model-cache", "engine-cache"} <= set(compose["volumes"])
    for name, svc in compose["services"].items():
        if svc.get("command", [""])[0] != "worker":
            continue
        mounts = dict(v.split(":", 1) for v in svc["volumes"])
        assert mounts.get("model-cache") == "/models" and mounts.get("engine-cache") == "/cache", name
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        instrs = _dockerfile(dockerfile)
        env = dict(p for a in (args for i, args in instrs if i == "ENV") for p in _env_pairs(a))
        assert env["HF_HOME"].startswith("/models/"), "hub downloads land on the model volume"
        assert env["XDG_CACHE_HOME"] == "/cache", "trt_build's cache ($XDG_CACHE_HOME/ditstream) is the volume"
        volumes = " ".join(args for i, args in instrs if i == "VOLUME")
        assert "/models" in volumes and "/cache" in volumes


def test_healthchecks_with_start_periods_for_engine_builds(compose):
    services = compose["services"]
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc["test"], f"{name} has no healthcheck"
        assert _seconds(hc["start_period"]) > 0 and _seconds(hc["timeout"]) < _seconds(hc["interval"]), name
    assert _seconds(services["worker"]["healthcheck"]["start_period"]) >= 600, "a TensorRT build takes minutes"
    assert _seconds(services["worker-cpu"]["healthcheck"]["start_period"]) >= 60
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        (hc,) = [a for i, a in _dockerfile(dockerfile) if i == "HEALTHCHECK"]
        m = re.search(r"--start-period=(\S+)", hc)
        assert m and _seconds(m.group(1)) >= 60, dockerfile
        assert "healthcheck.sh" in hc
    gpu_hc = next(a for i, a in _dockerfile("Dockerfile") if i == "HEALTHCHECK")
    assert _seconds(re.search(r"--start-period=(\S+)", gpu_hc).group(1)) >= 600  # type: ignore[union-attr]


def test_every_ditstream_variable_is_a_real_setting(compose):
    names: set[str] = set()
    for svc in compose["services"].values():
        names |= {k for k in (svc.get("environment") or {}) if k.startswith("DITSTREAM_")}
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        for i, args in _dockerfile(dockerfile):
            if i == "ENV":
                names |= {k for k, _ in _env_pairs(args) if k.startswith("DITSTREAM_")}
    fields = set(Settings.model_fields)
    unknown = sorted(n for n in names if n.removeprefix("DITSTREAM_").lower() not in fields)
    assert not unknown, f"not settings (typos?): {unknown}"


def test_no_secrets_baked_in(compose):
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            if SECRETISH.search(key):
                assert value == "" or INTERPOLATION.match(value), f"{name}: {key} has a literal value"
            assert not re.search(r"redis://[^@/]*:[^@/]+@", value), f"{name}: {key} holds a password"
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        for instr, args in _dockerfile(dockerfile):
            if instr in ("ENV", "ARG"):
                for k, _v in _env_pairs(args) or [(args.split("=")[0], "")]:
                    assert not SECRETISH.search(k), f"{dockerfile}: {instr} {k} bakes a secret-like value"
            if instr in ("COPY", "ADD"):
                assert ".env" not in args and "secret" not in args.lower(), f"{dockerfile}: {instr} {args}"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".git", ".env", "*.onnx", "*.engine", "*.plan"):
        assert pattern in ignore, f".dockerignore should exclude {pattern}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_base_user_and_layout(dockerfile: str):
    instrs = _dockerfile(dockerfile)
    args = dict(p for a in (a for i, a in instrs if i == "ARG") for p in _env_pairs(a))
    (base,) = [a for i, a in instrs if i == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), base)
    if dockerfile == "Dockerfile":
        assert base.startswith(("nvcr.io/nvidia/tensorrt:", "nvcr.io/nvidia/cuda:", "nvidia/cuda:")), base
    else:
        assert "nvidia" not in base
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    last_user = max(k for k, (i, _a) in enumerate(instrs) if i == "USER")
    assert all(i not in ("RUN", "COPY") for i, _a in instrs[last_user + 1:]), "nothing installed after USER"
    for instr, a in instrs:
        if instr == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"
    (entry,) = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert "entrypoint.sh" in entry and "tini" in entry, "signals reach ditstream (graceful SIGTERM)"
    assert any(i == "EXPOSE" and "8000" in a for i, a in instrs)


def test_entrypoint_and_healthcheck_scripts():
    for script in ("entrypoint.sh", "healthcheck.sh"):
        path = ROOT / "docker" / script
        assert path.stat().st_mode & 0o111, f"{script} is executable"
        subprocess.run(["sh", "-n", str(path)], check=True)
    text = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "exec ditstream serve" in text and "exec ditstream worker" in text


def test_the_commands_compose_runs_exist():
    from typer.testing import CliRunner

    from ditstream.cli import app

    runner = CliRunner()
    for cmd in (["worker", "--help"], ["serve", "--help"], ["bench", "scale", "--help"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
    worker_help = runner.invoke(app, ["worker", "--help"]).output
    assert "--threads" in worker_help and "--redis" in worker_help
    assert "--redis" in runner.invoke(app, ["serve", "--help"]).output


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.cpu"])
def test_the_import_check_imports_the_install_not_the_source_folder(dockerfile: str):
    """In WORKDIR /app, next to the copied ditstream/ source folder, ``python -c "import ditstream..."``
    imports that folder (which has no server/ inside: the package-dir mapping exists only once
    installed) and the build fails. Every such check must leave /app first."""
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    workdir = "/"
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["WORKDIR"]:
            workdir = words[1]
        if words[:1] == ["RUN"] and 'python -c "import ditstream' in line:
            before = line.split('python -c "import ditstream')[0]
            assert workdir != "/app" or "cd /" in before, f"{dockerfile}: {line.strip()[:120]}"


def test_gateways_publish_the_webrtc_udp_range_and_announce_the_public_host(compose):
    """ICE binds DITSTREAM_WEBRTC_PORT_RANGE inside and announces that port: published one to one."""
    for name in ("gateway", "gateway-cpu"):
        svc = compose["services"][name]
        env = svc["environment"]
        assert env["DITSTREAM_WEBRTC_PORT_RANGE"] == "${DITSTREAM_WEBRTC_PORT_RANGE:-50000-50100}"
        assert env["DITSTREAM_WEBRTC_PUBLIC_HOST"].startswith("${DITSTREAM_WEBRTC_PUBLIC_HOST")
        udp = [str(p) for p in svc["ports"] if str(p).endswith("/udp")]
        assert udp == ["${DITSTREAM_WEBRTC_PORT_RANGE:-50000-50100}:${DITSTREAM_WEBRTC_PORT_RANGE:-50000-50100}/udp"]
    assert Settings(webrtc_port_range="50000-50100", webrtc_public_host="").webrtc_ports() == (50000, 50100)
