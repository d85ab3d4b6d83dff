"""deploy/kubernetes/: every manifest valid for the API server, and the manifests agree with each
other and with the code.

- Core kinds against Kubernetes' own schemas (``kubernetes-validate``, strict: an unknown or
  misspelt field fails, as the API server's strict field validation does).
- KEDA's ``ScaledObject`` and the Prometheus operator's ``ServiceMonitor`` against their CRDs'
  schemas, kept in deploy/kubernetes/schemas/ (source and version in its README), unknown fields
  forbidden the same way.
- Cross-references: Services select pods and reach their ports, probes use declared ports, every
  ConfigMap/Secret/claim named exists, the ScaledObject scales the GPU worker Deployment on a metric
  the gateway exports, the ServiceMonitor scrapes the gateway's /metrics, settings are real
  ``DITSTREAM_*`` names with valid values, the Redis URL names the sentinels and master deployed here,
  and the termination grace periods cover a gateway's hand-over and a worker's drain.

Each check is a function of the loaded documents returning its problems, so the last test breaks a
copy of the manifests on purpose and sees each check fail.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ditstream.server.metrics import FLEET_GAUGES, WORKERS_WANTED
from ditstream.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
#: The Kubernetes release the manifests are validated for (a recent one kubernetes-validate ships).
K8S_VERSION = "1.34"
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
               ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json"}
WORKLOADS = ("Deployment", "StatefulSet")

Docs = list[dict[str, Any]]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _load() -> Docs:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _of(docs: Docs, *kinds: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in kinds]


def _named(docs: Docs, kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _workloads_selected(docs: Docs, selector: dict[str, str]) -> list[dict[str, Any]]:
    return [w for w in _of(docs, *WORKLOADS) if selector and _matches(selector, _pod(w)["metadata"]["labels"])]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return _pod(workload)["spec"]["containers"]


def _port_ok(port: int | str, containers: list[dict[str, Any]]) -> bool:
    ports = [p for c in containers for p in c.get("ports", [])]
    return any(p.get("name") == port or p["containerPort"] == port for p in ports)


# ------------------------------------------------------------------------------------ checks
@functools.lru_cache(maxsize=256)
def _core_problem(doc_json: str) -> str | None:
    """One document against Kubernetes' schema (cached by content: the broken copies re-check only
    what they changed)."""
    d = json.loads(doc_json)
    try:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{d['kind']} {d['metadata']['name']}: {exc.message} at {list(exc.path)}"
    return None


def core_schema_problems(docs: Docs) -> list[str]:
    found = [_core_problem(json.dumps(d, sort_keys=True)) for d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    return [p for p in found if p is not None]


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden wherever it lists properties (the API server's
    strict field validation), except where it preserves unknown fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    return [_strict(s) for s in schema] if isinstance(schema, list) else schema


def crd_schema_problems(docs: Docs) -> list[str]:
    out = []
    for (api, kind), file in CRD_SCHEMAS.items():
        found = [d for d in docs if d["apiVersion"] == api and d["kind"] == kind]
        if not found:
            out.append(f"no {kind} ({api}) in the manifests")
        validator = jsonschema.Draft7Validator(_strict(json.loads((K8S / "schemas" / file).read_text())))
        for d in found:
            out += [f"{kind} {d['metadata']['name']}: {e.message} at {list(e.absolute_path)}"
                    for e in validator.iter_errors(d)]
    return out


def service_problems(docs: Docs) -> list[str]:
    """Each Service selects the pods of a workload and targets ports those pods declare."""
    out = []
    for svc in _of(docs, "Service"):
        name, selector = svc["metadata"]["name"], svc["spec"].get("selector", {})
        pods = _workloads_selected(docs, selector)
        if not pods:
            out.append(f"Service {name}: selector {selector} matches no workload's pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            out += [f"Service {name}: targetPort {target} is no port of {w['metadata']['name']}"
                    for w in pods if not _port_ok(target, _containers(w))]
    for w in _of(docs, "StatefulSet"):
        if _named(docs, "Service", w["spec"]["serviceName"]) is None:
            out.append(f"StatefulSet {w['metadata']['name']}: serviceName {w['spec']['serviceName']} is no Service")
    for w in _of(docs, *WORKLOADS):
        if not _matches(w["spec"]["selector"]["matchLabels"], _pod(w)["metadata"]["labels"]):
            out.append(f"{w['kind']} {w['metadata']['name']}: its selector does not match its own pods")
    return out


def probe_problems(docs: Docs) -> list[str]:
    out = []
    for w in _of(docs, *WORKLOADS):
        for c in _containers(w):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind, {})
                port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
                if port is not None and not _port_ok(port, [c]):
                    out.append(f"{w['metadata']['name']}/{c['name']}: {kind} on undeclared port {port}")
    return out


def script_problems(docs: Docs) -> list[str]:
    """Every shell script a ConfigMap carries (Redis's and the sentinels' start-up) parses (``sh -n``)."""
    out = []
    for cm in _of(docs, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key.endswith(".sh"):
                done = subprocess.run(["sh", "-n"], input=text, text=True, capture_output=True, timeout=10)
                if done.returncode:
                    out.append(f"ConfigMap {cm['metadata']['name']} {key}: {done.stderr.strip()}")
    return out


def reference_problems(docs: Docs) -> list[str]:
    """Every ConfigMap, Secret, claim, Service and pod label that something names exists."""
    generated = {g["name"] for g in _kustomization().get("secretGenerator", [])}
    out = []
    for w in _of(docs, *WORKLOADS):
        where, spec = w["metadata"]["name"], _pod(w)["spec"]
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src and not _named(docs, "ConfigMap", src["configMapRef"]["name"]):
                    out.append(f"{where}: ConfigMap {src['configMapRef']['name']} does not exist")
                if "secretRef" in src and src["secretRef"]["name"] not in generated:
                    out.append(f"{where}: Secret {src['secretRef']['name']} is not generated")
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v and not _named(docs, "PersistentVolumeClaim",
                                                           v["persistentVolumeClaim"]["claimName"]):
                out.append(f"{where}: claim {v['persistentVolumeClaim']['claimName']} does not exist")
            if "configMap" in v and not _named(docs, "ConfigMap", v["configMap"]["name"]):
                out.append(f"{where}: ConfigMap {v['configMap']['name']} does not exist")
    for pdb in _of(docs, "PodDisruptionBudget"):
        if not _workloads_selected(docs, pdb["spec"]["selector"]["matchLabels"]):
            out.append(f"PodDisruptionBudget {pdb['metadata']['name']}: selects no workload's pods")
    for ing in _of(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = _named(docs, "Service", backend["name"])
                if svc is None or backend["port"].get("name") not in {p.get("name") for p in svc["spec"]["ports"]}:
                    out.append(f"Ingress {ing['metadata']['name']}: no Service port {backend}")
    images = {i["name"] for i in _kustomization().get("images", [])}
    out += [f"{w['metadata']['name']}: image {c['image']} is not in kustomization.yaml's images"
            for w in _of(docs, "Deployment") for c in _containers(w) if c["image"] not in images]
    return out


def autoscaling_problems(docs: Docs) -> list[str]:
    """KEDA scales the GPU worker Deployment on the gateway's signal; Prometheus scrapes the gateway."""
    out = []
    for so in _of(docs, "ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        target = _named(docs, ref.get("kind", "Deployment"), ref["name"])
        if target is None or target["kind"] != "Deployment":
            out.append(f"ScaledObject {so['metadata']['name']}: target {ref} is no Deployment here")
        elif str(_containers(target)[0]["resources"]["limits"].get("nvidia.com/gpu")) != "1":
            out.append(f"ScaledObject {so['metadata']['name']}: target {ref['name']} asks for no GPU")
        for trig in so["spec"]["triggers"]:
            names = set(re.findall(r"\bditstream_\w+", trig["metadata"].get("query", "")))
            if trig["type"] != "prometheus" or names != {WORKERS_WANTED} or WORKERS_WANTED not in FLEET_GAUGES:
                out.append(f"ScaledObject trigger must query {WORKERS_WANTED} (a gauge the gateway exports): {names}")
    gateway = _named(docs, "Service", "ditstream-gateway")
    for sm in _of(docs, "ServiceMonitor"):
        svc_labels = (gateway or {}).get("metadata", {}).get("labels", {})
        if gateway is None or not _matches(sm["spec"]["selector"]["matchLabels"], svc_labels):
            out.append(f"ServiceMonitor {sm['metadata']['name']}: does not select the gateway Service")
            continue
        ports = {p.get("name") for p in gateway["spec"]["ports"]}
        out += [f"ServiceMonitor endpoint {e} is not the gateway's /metrics port" for e in sm["spec"]["endpoints"]
                if e.get("port") not in ports or e.get("path", "/metrics") != "/metrics"]
    return out


def _settings_env(docs: Docs) -> dict[str, str]:
    env = dict(_named(docs, "ConfigMap", "ditstream-config")["data"])
    for w in _of(docs, "Deployment"):
        env |= {e["name"]: e["value"] for c in _containers(w) for e in c.get("env", []) if "value" in e}
    for line in (K8S / "secrets.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def settings_problems(docs: Docs) -> list[str]:
    """Every DITSTREAM_* name is a setting ``serve``/``worker`` read, with a value they accept; the
    roles are the entrypoint's; the Redis URL names the sentinels and the master deployed here."""
    out = []
    env = _settings_env(docs)
    fields = {f"DITSTREAM_{name.upper()}" for name in Settings.model_fields}
    out += [f"{k} is no setting (server/settings.py)" for k in env if k not in fields]
    try:
        Settings(**{k.removeprefix("DITSTREAM_").lower(): v for k, v in env.items() if k in fields})
    except ValueError as exc:
        out.append(f"the settings do not validate: {exc}")
    out += [f"{w['metadata']['name']}: args {c.get('args')} is not a role of docker/entrypoint.sh"
            for w in _of(docs, "Deployment") for c in _containers(w) if c.get("args") not in (["serve"], ["worker"])]
    url = env.get("DITSTREAM_REDIS_URL", "")
    m = re.fullmatch(r"redis\+sentinel://([^/]+)/([^/]+)/(\d+)", url)
    sentinel = _named(docs, "StatefulSet", "ditstream-sentinel")
    scripts = (_named(docs, "ConfigMap", "ditstream-redis-scripts") or {}).get("data", {})
    if m is None or sentinel is None:
        return [*out, f"DITSTREAM_REDIS_URL {url!r} is not redis+sentinel://host:port[,...]/MASTER/DB for the "
                      "sentinels deployed here"]
    name, svc = sentinel["metadata"]["name"], sentinel["spec"]["serviceName"]
    port = _containers(sentinel)[0]["ports"][0]["containerPort"]
    want = {f"{name}-{i}.{svc}:{port}" for i in range(sentinel["spec"]["replicas"])}
    if set(m.group(1).split(",")) != want:
        out.append(f"DITSTREAM_REDIS_URL lists {m.group(1)}, the sentinels are {sorted(want)}")
    if f"sentinel monitor {m.group(2)} " not in scripts.get("sentinel.sh", ""):
        out.append(f"DITSTREAM_REDIS_URL's master {m.group(2)!r} is not the one the sentinels monitor")
    return out


def _defaults(path: str, qualname: str) -> dict[str, Any]:
    """The keyword defaults of a function in the source (read, not imported: the worker imports torch)."""
    cls, _, name = qualname.rpartition(".")
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            fn = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == name)
            args = fn.args.args[len(fn.args.args) - len(fn.args.defaults):]
            return {a.arg: ast.literal_eval(d) for a, d in zip(args, fn.args.defaults)}
    raise LookupError(f"{qualname} not in {path}")


def _drain_bound_s() -> float:
    """The longest a worker takes to leave after SIGTERM, from ``ditstream worker``'s own handling:
    its /health server's shutdown, then ``Worker.stop`` (answer held jobs for ``drain_s``, then join
    its threads, each up to ``timeout``)."""
    stop = _defaults("server/scale/worker.py", "Worker.stop")
    health = _defaults("ditstream/commands/_worker_http.py", "HealthServer.shutdown")
    return health["timeout_s"] + stop["drain_s"] + stop["timeout"]


def grace_problems(docs: Docs) -> list[str]:
    out = []
    worker = _named(docs, "Deployment", "ditstream-worker")
    gateway = _named(docs, "Deployment", "ditstream-gateway")
    grace = float(_settings_env(docs).get("DITSTREAM_SHUTDOWN_GRACE_S", Settings().shutdown_grace_s))
    if worker is None or _pod(worker)["spec"].get("terminationGracePeriodSeconds", 30) < 2 * _drain_bound_s():
        out.append(f"the worker's terminationGracePeriodSeconds is under twice its drain bound ({_drain_bound_s()} s)")
    if gateway is None or _pod(gateway)["spec"].get("terminationGracePeriodSeconds", 30) <= 2 * grace + 5:
        out.append(f"the gateway's terminationGracePeriodSeconds is not above 2 x SHUTDOWN_GRACE_S + 5 ({grace})")
    return out


CHECKS: dict[str, Callable[[Docs], list[str]]] = {
    "core_schema": core_schema_problems, "crd_schema": crd_schema_problems, "services": service_problems,
    "probes": probe_problems, "scripts": script_problems, "references": reference_problems,
    "autoscaling": autoscaling_problems, "settings": settings_problems, "grace": grace_problems}


# ------------------------------------------------------------------------------------ tests
def test_every_manifest_is_in_the_kustomization():
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_the_manifests_pass_every_check():
    docs = _load()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "Ingress", "PodDisruptionBudget", "ScaledObject",
            "ServiceMonitor", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    problems = {name: check(docs) for name, check in CHECKS.items()}
    assert problems == {name: [] for name in CHECKS}


def _set(kind: str, name: str, *keys: str | int) -> Callable[[Docs, Any], None]:
    """A breakage: set the field at ``keys`` of ``kind/name`` to a value."""
    def apply(docs: Docs, value: Any) -> None:
        node: Any = _named(docs, kind, name)
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return apply


C0 = ("spec", "template", "spec", "containers", 0)
COMPONENT = "app.kubernetes.io/component"
URL = "DITSTREAM_REDIS_URL"
SENTINELS = ",".join(f"ditstream-sentinel-{i}.ditstream-sentinel:26379" for i in range(3))
BREAKS = [  # (check, where, value, what its problems say)
    ("core_schema", _set("Deployment", "ditstream-worker", *C0, "gpus"), 1, "gpus"),
    ("core_schema", _set("Service", "ditstream-gateway", "spec", "ports", 0, "port"), "eighty", "eighty"),
    ("crd_schema", _set("ScaledObject", "ditstream-worker", "spec", "minReplicas"), 1, "minReplicas"),
    ("crd_schema", _set("ServiceMonitor", "ditstream-gateway", "spec", "endpoints", 0, "interval"), "15 seconds",
     "15 seconds"),
    ("services", _set("Service", "ditstream-gateway", "spec", "selector", COMPONENT), "gw", "matches no"),
    ("services", _set("Service", "ditstream-gateway", "spec", "ports", 0, "targetPort"), "web", "targetPort web"),
    ("probes", _set("Deployment", "ditstream-gateway", *C0, "readinessProbe", "httpGet", "port"), "ready",
     "undeclared port"),
    ("scripts", _set("ConfigMap", "ditstream-redis-scripts", "data", "redis.sh"), "if true; then exec redis-server\n",
     "redis.sh"),
    ("references", _set("Deployment", "ditstream-worker", "spec", "template", "spec", "volumes", 0,
                        "persistentVolumeClaim", "claimName"), "engines", "claim engines"),
    ("references", _set("Deployment", "ditstream-gateway", *C0, "envFrom", 1, "secretRef", "name"), "keys",
     "Secret keys"),
    ("references", _set("PodDisruptionBudget", "ditstream-worker", "spec", "selector", "matchLabels", COMPONENT),
     "workers", "selects no"),
    ("autoscaling", _set("ScaledObject", "ditstream-worker", "spec", "scaleTargetRef", "name"), "ditstream-gateway",
     "asks for no GPU"),
    ("autoscaling", _set("ScaledObject", "ditstream-worker", "spec", "triggers", 0, "metadata", "query"),
     "max(ditstream_worker_wanted)", "must query"),
    ("autoscaling", _set("ServiceMonitor", "ditstream-gateway", "spec", "endpoints", 0, "port"), "metrics",
     "/metrics port"),
    ("settings", _set("ConfigMap", "ditstream-config", "data", "DITSTREAM_WORKER_CAPACITY"), "4", "is no setting"),
    ("settings", _set("ConfigMap", "ditstream-config", "data", "DITSTREAM_WORKER_MAX_JOBS"), "0", "do not validate"),
    ("settings", _set("ConfigMap", "ditstream-config", "data", URL), "redis+sentinel://ditstream-sentinel:26379/"
     "ditstream/0", "the sentinels are"),
    ("settings", _set("ConfigMap", "ditstream-config", "data", URL), f"redis+sentinel://{SENTINELS}/mymaster/0",
     "'mymaster' is not"),
    ("settings", _set("Deployment", "ditstream-worker", *C0, "args"), ["work"], "not a role"),
    ("grace", _set("Deployment", "ditstream-worker", "spec", "template", "spec", "terminationGracePeriodSeconds"), 20,
     "drain bound"),
    ("grace", _set("ConfigMap", "ditstream-config", "data", "DITSTREAM_SHUTDOWN_GRACE_S"), "15",
     "2 x SHUTDOWN_GRACE_S"),
]


@pytest.mark.parametrize(("check", "where", "value", "says"), BREAKS, ids=[f"{b[0]}-{b[3]}" for b in BREAKS])
def test_each_check_fails_on_a_broken_manifest(check: str, where: Callable[[Docs, Any], None], value: Any, says: str):
    docs = copy.deepcopy(_load())
    where(docs, value)
    problems = CHECKS[check](docs)
    assert any(says in p for p in problems), problems
