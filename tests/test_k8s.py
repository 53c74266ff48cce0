"""The Kubernetes manifests (k8s/) render, validate and say what the docs promise.

Offline only: `kubectl kustomize` renders every overlay, `kubernetes-validate --strict` checks
every object against the API schemas of a pinned Kubernetes version, `checkov` runs once over
all rendered overlays, and the assertions below check what no generic tool knows about this
project (who may talk to whom, read-only data, settings). Settings are defined once: the fixed
environment and the container values of the FEDERIMED_* settings are ENV in docker/Dockerfile,
so compose.yaml and the manifests may set only real settings, and only what differs from the
image and from the settings' defaults (federimed/settings.py).

Issue 9, "the hospital stays in control", as far as manifests can show it: hospitals are given
the fleet gateway (Fleet API only), never the SuperLink; the SuperLink admits only the
consortium's own pods and hospitals may reach only the gateway; every separate app runner and
the API it connects to hold the same Runtime API secret. Issue 27, the guard in the hospital's
own process: every hospital's SuperNode runs the hospital's guard under its own site policy,
mounted read-only from an object the manifests do not carry, reads the data read-only and
writes the egress ledger on a claim no other pod mounts; the ClientApp runner, where the
consortium's code runs, mounts neither policy nor ledger, runs as another user and group, and
may reach nothing but its SuperNode's port 9094, by address: no DNS.

The tools live in their own venv, .venv-k8s (checkov pins many heavy dependencies):
    python3 -m venv .venv-k8s && .venv-k8s/bin/pip install -r requirements-k8s.txt
They are looked up there first, then on PATH. A missing tool is a failure, never a skip.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from pydantic import TypeAdapter

from federimed import settings
from federimed.deploy.flower import HARDENED_ENV
from federimed.hospital.policy import POLICY_ENV, approve, load_policy
from federimed.tracks.generative.smollm2 import CACHE_ENV

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = K8S / "overlays"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCS = ROOT / "docs" / "kubernetes.md"
COMPOSE_OVERRIDES = ("compose.gpu.yaml", "compose.cpu.yaml")
TOOLS_VENV = ROOT / ".venv-k8s"
INSTALL_HINT = (
    "install the validation tools into their own venv:\n"
    "    python3 -m venv .venv-k8s && .venv-k8s/bin/pip install -r requirements-k8s.txt"
)

# Kubernetes versions the manifests must be valid for: the oldest we support and the newest
# the pinned kubernetes-validate (requirements-k8s.txt) ships schemas for.
K8S_VERSIONS = ("1.31.0", "1.37.0")
EXPECTED_OVERLAYS = {"consortium", "hospital", "hospital-gpu", "example-three-hospitals"}
UID = 49999
# The hospitals' ClientApp runners run the consortium's code: another user and group than the
# SuperNode (the guard, which writes the ledger). docker/Dockerfile's superexec user `clientapp`.
RUNNER_UID = 49998
UIDS = {"clientapp": RUNNER_UID}  # by role; every other pod runs as UID
# Image names follow compose.yaml / docker/Dockerfile (targets superlink, gateway, supernode,
# superexec); the tag is the release, pinned (never :latest).
IMAGES = {
    "superlink": "federimed/superlink:0.1.0",
    "fleet-gateway": "federimed/gateway:0.1.0",
    "supernode": "federimed/supernode:0.1.0",
    "serverapp": "federimed/superexec:0.1.0",
    "clientapp": "federimed/superexec:0.1.0",
    "webapp": "federimed/superexec:0.1.0",
}
COMMANDS = {
    "superlink": ["superlink"],
    "fleet-gateway": ["gateway"],
    "supernode": ["supernode"],
    "serverapp": ["superexec"],
    "clientapp": ["superexec"],
    "webapp": ["serve"],
}
# Set by every image (the local processes get HARDENED_ENV from federimed.deploy.flower), and
# nowhere else; the images also keep the model hub offline.
FIXED_ENV = {**HARDENED_ENV, "HF_HUB_OFFLINE": "1"}
# docker/Dockerfile targets that run a component (images are named after their target), and
# the settings of that component.
# A component's stage when its container runs another command of its image's CLI: "IMAGE:CMD".
SIDE_COMMANDS = ("serve", "exporter")
MODELS = {
    "superlink": (settings.SuperLinkSettings,),
    "gateway": (settings.GatewaySettings,),
    "supernode": (settings.SuperNodeSettings,),
    "superexec": (settings.SuperExecSettings, settings.RuntimeSettings, settings.ServeSettings),
    # the same images running the web app and a hospital's exporter (monitoring profile)
    "superexec:serve": (settings.ServeSettings, settings.RuntimeSettings),
    "supernode:exporter": (settings.ExporterSettings,),
    "prometheus": (),  # compose's monitoring profile: Prometheus itself, no FEDERIMED_* setting
}
# FEDERIMED_* variables a component reads that are no field of its settings models, each with
# its check: the hospital's site policy is read by the guard in the SuperNode
# (federimed/hospital/policy.py, federimed/hospital/guard.py), from a file the deployment mounts,
# and by nothing in the app runner's image (a runner that sets it is an error); the converted
# generative models' cache (federimed/tracks/generative/decoder.py), which the app image fills
# at build time.
EXTRA_VARIABLES = {
    "supernode": {POLICY_ENV: lambda value: Path(value).is_absolute()},
    "superexec": {CACHE_ENV: lambda value: Path(value).is_absolute()},
}
DNS_PORT = 53
# Pod labels (app.kubernetes.io/name) of the roles the policies talk about.
GATEWAY = "fleet-gateway"
# The consortium's own pods that may reach the SuperLink: its app runner, the fleet gateway and
# operator Jobs (federimed enroll / submit). Never anything from another namespace.
SUPERLINK_PEERS = {"serverapp", GATEWAY, "federimed-operator"}


# --------------------------------------------------------------------------- tools / fixtures


def tool(name: str) -> str:
    candidate = TOOLS_VENV / "bin" / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"`{name}` not found in {TOOLS_VENV}/bin nor on PATH: {INSTALL_HINT}", pytrace=False
    )


def run(argv: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # checkov: never phone home (guidelines download, Prisma mapping); everything runs offline.
    env.update({"BC_SKIP_MAPPING": "TRUE", "CHECKOV_EXPERIMENTAL_IMAGE_REFERENCING": "False"})
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kwargs
    )


def overlay_dirs() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """overlay name -> {"path": rendered file, "docs": [objects]} (rendered once per module)."""
    kubectl = tool("kubectl")
    out_dir = tmp_path_factory.mktemp("k8s-rendered")
    result = {}
    for overlay in overlay_dirs():
        proc = run([kubectl, "kustomize", str(overlay)])
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        path = out_dir / f"{overlay.name}.yaml"
        path.write_text(proc.stdout)
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert docs, f"{overlay.name} rendered nothing"
        result[overlay.name] = {"path": path, "text": proc.stdout, "docs": docs}
    return result


def all_docs(rendered):
    for name, item in rendered.items():
        for doc in item["docs"]:
            yield name, doc


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def workloads(docs):
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}]


def pod_spec(doc) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(doc) -> list[dict]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def find(docs, kind, name, namespace=None) -> dict:
    hits = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["name"] == name
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]
    assert len(hits) == 1, f"expected one {kind}/{name} in {namespace}, found {len(hits)}"
    return hits[0]


def env_of(doc, docs) -> dict[str, str]:
    """The container's effective plain env: envFrom ConfigMaps first, then env (wins), with
    `$(VAR)` expanded as the kubelet does: from the variables before it and the Service
    variables of the pod's namespace (service_env). A reference left unexpanded fails here."""
    (container,) = pod_spec(doc)["containers"]
    ns = doc["metadata"].get("namespace")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "settings must not come from Secrets via env"
        cm = find(docs, "ConfigMap", source["configMapRef"]["name"], ns)
        env.update({k: str(v) for k, v in cm.get("data", {}).items()})
    services = service_env(doc, docs)
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are expected"
        value = VAR_REF.sub(lambda m: env.get(m[1], services.get(m[1], m[0])), str(item["value"]))
        assert not VAR_REF.search(value), (
            f"{doc['metadata']['name']}: {item['name']}={item['value']!r}: the kubelet would "
            "leave the reference as it is (no such variable, or no Service links)"
        )
        env[item["name"]] = value
    return env


VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Stand-ins for the ClusterIPs the API server assigns: one per Service of the rendered overlay.
CLUSTER_IP_BASE = ipaddress.ip_address("10.255.0.1")


def service_ip(service, docs) -> str:
    """The stand-in ClusterIP of a Service: distinct per Service of `docs`."""
    services = of_kind(docs, "Service")
    index = next(i for i, svc in enumerate(services) if svc is service)
    return str(CLUSTER_IP_BASE + index)


def service_env(doc, docs) -> dict[str, str]:
    """The variables the kubelet gives a pod for each Service of its namespace when
    enableServiceLinks is on (the API's default): NAME_SERVICE_HOST (the ClusterIP, here the
    stand-in service_ip), NAME_SERVICE_PORT and NAME_SERVICE_PORT_<PORT NAME>."""
    if pod_spec(doc).get("enableServiceLinks", True) is False:
        return {}
    ns = doc["metadata"].get("namespace")
    env = {}
    for svc in of_kind(docs, "Service"):
        if svc["metadata"].get("namespace") != ns or svc["spec"].get("clusterIP") == "None":
            continue
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        ports = svc["spec"]["ports"]
        env[f"{prefix}_SERVICE_HOST"] = service_ip(svc, docs)
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                name = port["name"].upper().replace("-", "_")
                env[f"{prefix}_SERVICE_PORT_{name}"] = str(port["port"])
    return env


def service_at(address: str, docs, ns: str) -> tuple[dict, int]:
    """(the Service, its port) a pod in `ns` reaches at HOST:PORT: a Service name (cluster DNS)
    or the ClusterIP a Service variable gave it (service_ip)."""
    host, port = address.rsplit(":", 1)
    for svc in of_kind(docs, "Service"):
        if service_ip(svc, docs) == host:
            return svc, int(port)
    service = in_cluster_service(host, docs, ns)
    assert service, f"{address}: no Service of this cluster"
    return find(docs, "Service", *service), int(port)


def role(doc) -> str:
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


def hospital_namespaces(docs) -> list[str]:
    return sorted(
        d["metadata"]["name"]
        for d in of_kind(docs, "Namespace")
        if d["metadata"].get("labels", {}).get("federimed.io/role") == "hospital"
    )


def namespace_labels(docs, ns) -> dict[str, str]:
    """The namespace's labels as the API server sees them (it adds kubernetes.io/metadata.name)."""
    labels = dict(find(docs, "Namespace", ns)["metadata"].get("labels", {}))
    return {**labels, "kubernetes.io/metadata.name": ns}


def pod_labels(doc) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def consortium_cases(rendered):
    """(overlay, docs, namespace) of every SuperLink: wherever hospitals are pointed at one."""
    for name, item in rendered.items():
        for doc in workloads(item["docs"]):
            if role(doc) == "superlink":
                yield name, item["docs"], doc["metadata"]["namespace"]


# --------------------------------------------------------------------------- volumes, services


def mount_of(doc, path) -> tuple[dict, dict]:
    """(the container's volumeMount that holds `path`, its volume): the deepest one."""
    (c,) = pod_spec(doc)["containers"]
    path = PurePosixPath(path)
    hits = [
        m
        for m in c.get("volumeMounts", [])
        if path == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in path.parents
    ]
    assert hits, f"{doc['metadata']['name']}: nothing is mounted at {path} (read-only root)"
    mount = max(hits, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
    return mount, volumes[mount["name"]]


def file_source(doc, path) -> tuple[str, str, str]:
    """(kind, name, key) of the ConfigMap or Secret a mounted file comes from."""
    mount, volume = mount_of(doc, path)
    assert "subPath" not in mount, f"{path}: a subPath mount never sees updates"
    relative = PurePosixPath(path).relative_to(mount["mountPath"]).as_posix()
    for source in volume.get("projected", {}).get("sources", [volume]):
        for kind, field in (("Secret", "secret"), ("ConfigMap", "configMap")):
            if field not in source:
                continue
            ref = source[field]
            name = ref.get("secretName") or ref.get("name")
            items = ref.get("items") or [{"key": relative, "path": relative}]
            for item in items:
                if item["path"] == relative:
                    return kind, name, item["key"]
    pytest.fail(f"{doc['metadata']['name']}: {path} comes from no ConfigMap or Secret")


def writable_volume(doc, path) -> dict:
    """The volume `path` is written to: mounted read-write, an emptyDir or a claim."""
    mount, volume = mount_of(doc, path)
    where = f"{doc['metadata']['name']}: {path}"
    assert not mount.get("readOnly"), f"{where} is on a read-only mount"
    claim = volume.get("persistentVolumeClaim")
    assert "emptyDir" in volume or (claim and not claim.get("readOnly")), f"{where}: {volume}"
    return volume


def target_port(service, port: int, docs) -> int:
    """The container port behind `port` of `service` (a named targetPort resolved in its pods)."""
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    target = entry.get("targetPort", port)
    if isinstance(target, int):
        return target
    ns = service["metadata"]["namespace"]
    selector = service["spec"]["selector"]
    named = {
        p["name"]: p["containerPort"]
        for doc in workloads(docs)
        if doc["metadata"]["namespace"] == ns
        and all(pod_labels(doc).get(k) == v for k, v in selector.items())
        for c in pod_spec(doc)["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }
    return named[target]


def in_cluster_service(host: str, docs, ns: str) -> tuple[str, str] | None:
    """(service, namespace) a pod in `ns` reaches by `host` through cluster DNS (NAME,
    NAME.NAMESPACE, NAME.NAMESPACE.svc[.cluster.local]); None for a name outside the cluster."""
    for suffix in (".svc.cluster.local", ".svc"):
        if host.endswith(suffix):
            service, _, namespace = host[: -len(suffix)].partition(".")
            return service, namespace
    labels = host.split(".")
    namespaces = {d["metadata"]["name"] for d in of_kind(docs, "Namespace")}
    if len(labels) == 1:
        return host, ns
    if len(labels) == 2 and labels[1] in namespaces:
        return labels[0], labels[1]
    return None


# --------------------------------------------------------------------------- images, compose


@functools.cache
def dockerfile_env() -> dict[str, dict[str, str]]:
    """stage -> the ENV it ends with, following `FROM <stage>` inheritance."""
    stages: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if m := re.match(r"\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            env = dict(stages.get(m.group(1), {}))
            stages[m.group(2) or f"_{len(stages)}"] = env
        elif m := re.match(r"\s*ENV\s+(.+)", line, re.IGNORECASE):
            words = shlex.split(m.group(1))
            if "=" not in words[0]:  # legacy `ENV KEY value`
                env[words[0]] = " ".join(words[1:])
            else:
                env.update(word.split("=", 1) for word in words)
    for stage in MODELS:  # a command's pseudo-stage has its image's environment
        stages.setdefault(stage, stages.get(stage.split(":")[0], {}))
    return stages


def image_stage(image: str) -> str:
    """The docker/Dockerfile target an image was built from: REGISTRY/federimed/<target>:TAG."""
    stage = re.split(r"[:@]", image.rsplit("/", 1)[-1])[0]
    assert stage in MODELS, f"{image}: not an image of docker/Dockerfile ({sorted(MODELS)})"
    return stage


COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_value(value) -> str:
    """Compose interpolation with the defaults written in the file (not this shell's env)."""
    return COMPOSE_VAR.sub(lambda m: m.group(2) or "", str(value))


def compose_env(service) -> dict[str, str | None]:
    """The service's environment as written; None: taken from the shell or .env if set there."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else compose_value(v) for k, v in env.items()}


def compose_variants() -> dict[str, dict]:
    """compose.yaml alone and with each override file: name -> services (environment merged)."""
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    variants = {"compose.yaml": base}
    for override in COMPOSE_OVERRIDES:
        services = copy.deepcopy(base)
        extra = yaml.safe_load((ROOT / override).read_text()).get("services") or {}
        for name, service in extra.items():
            env = {**compose_env(services[name]), **compose_env(service)}
            services[name]["environment"] = env
        variants[f"compose.yaml + {override}"] = services
    return variants


def components(rendered):
    """(where, image target, the env it sets) of every container that runs a component:
    each k8s workload, and each compose service that keeps its image's entrypoint (the
    one-shots init, enroll and submit take their settings as arguments)."""
    for name, item in rendered.items():
        for doc in workloads(item["docs"]):
            (c,) = pod_spec(doc)["containers"]
            where = f"k8s {name}: {doc['metadata']['namespace']}/{doc['metadata']['name']}"
            stage = image_stage(c["image"]) + _side_command(c.get("args"))
            yield where, stage, env_of(doc, item["docs"])
    for variant, services in compose_variants().items():
        for name, service in services.items():
            side = _compose_side_command(service)
            if "entrypoint" not in service or side:
                target = (service.get("build") or {}).get("target")
                stage = target or image_stage(compose_value(service["image"]))
                yield f"{variant}: {name}", stage + side, compose_env(service)


def _side_command(argv) -> str:
    """ ":serve" for a container that runs `federimed serve` (etc.), "" for its image's own."""
    return f":{argv[0]}" if argv and len(argv) == 1 and argv[0] in SIDE_COMMANDS else ""


def _compose_side_command(service: dict) -> str:
    """The side command of a compose service: its `command`, or its `entrypoint`
    ["federimed", CMD] where the image's own entrypoint names another command."""
    entrypoint = service.get("entrypoint") or []
    if entrypoint[:1] == ["federimed"]:
        return _side_command(entrypoint[1:])
    return _side_command(service.get("command"))


def setting_field(stage: str, key: str):
    """The settings field a FEDERIMED_* variable sets in the component of `stage`, or None."""
    for model in MODELS[stage]:
        prefix = model.model_config["env_prefix"]
        field = key[len(prefix) :].lower() if key.startswith(prefix) else None
        if field in model.model_fields:
            return model.model_fields[field]
    return None


def parsed(stage: str, key: str, value: str):
    return TypeAdapter(setting_field(stage, key).annotation).validate_python(value)


def load(model, env: dict[str, str | None], monkeypatch):
    """`model` as a container with exactly `env` sees it (this shell's FEDERIMED_* removed)."""
    for key in list(os.environ):
        if key.startswith("FEDERIMED_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FEDERIMED_") and value is not None:
            monkeypatch.setenv(key, value)
    return model()


def effective(doc, docs, model, monkeypatch):
    """The container's settings: the image's ENV (docker/Dockerfile), then the manifest's env."""
    (c,) = pod_spec(doc)["containers"]
    env = {**dockerfile_env()[image_stage(c["image"])], **env_of(doc, docs)}
    return load(model, env, monkeypatch)


# --------------------------------------------------------------------------- rendering & tools


def test_every_overlay_renders(rendered):
    assert set(rendered) >= EXPECTED_OVERLAYS, (
        f"missing overlays: {EXPECTED_OVERLAYS - set(rendered)}"
    )
    example = rendered["example-three-hospitals"]["docs"]
    assert [d["metadata"]["name"] for d in of_kind(example, "Namespace")] == [
        "consortium",
        "hospital-1",
        "hospital-2",
        "hospital-3",
    ]
    for name, doc in all_docs(rendered):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace"), f"{name}: {doc['kind']} has no namespace"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_schemas_strict(rendered, version):
    validate = tool("kubernetes-validate")
    files = [str(item["path"]) for item in rendered.values()]
    proc = run([validate, "--strict", "-k", version, *files])
    problems = [line for line in proc.stdout.splitlines() if not line.startswith("INFO ")]
    # A kind without a schema is only a WARN for the tool: here it is a failure too.
    assert proc.returncode == 0 and not problems, "\n".join(problems) + proc.stderr
    checked = sum(1 for line in proc.stdout.splitlines() if line.startswith("INFO "))
    assert checked == sum(len(item["docs"]) for item in rendered.values())


def test_checkov(rendered, tmp_path):
    checkov = tool("checkov")
    skips = yaml.safe_load((K8S / "checkov-skips.yaml").read_text())["skips"]
    for skip in skips:
        assert re.fullmatch(r"CKV2?_K8S_\d+", skip["id"]), skip
        assert len(skip.get("reason", "").strip()) >= 40, f"{skip['id']}: write down why"
    # Resource-level skips: annotations `checkov.io/skipN: ID=reason`, reason required.
    for name, doc in all_docs(rendered):
        for key, value in doc["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check_id, sep, reason = value.partition("=")
                assert sep and "=" not in reason, f"{name}: {key}: want ID=reason, got {value!r}"
                assert re.fullmatch(r"CKV2?_K8S_\d+", check_id), f"{name}: {key}: {value!r}"
                assert len(reason.strip()) >= 40, f"{name}: {key}: the reason is too thin"
    scan_dir = tmp_path / "scan"
    scan_dir.mkdir()
    for item in rendered.values():
        shutil.copy(item["path"], scan_dir)
    argv = [
        checkov,
        "-d",
        str(scan_dir),
        "--framework",
        "kubernetes",
        "--skip-download",
        "-o",
        "json",
        "--quiet",
    ]
    argv += ["--skip-check", ",".join(s["id"] for s in skips)] if skips else []
    proc = run(argv, timeout=300)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov gave no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-3000:]}"
        )
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0, summary
    assert summary["passed"] > 100 and summary["resource_count"] > 50, summary
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------- pod security


def test_pod_security(rendered):
    for name, doc in all_docs(rendered):
        if doc["kind"] == "Namespace":
            labels = doc["metadata"]["labels"]
            assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", (name, doc)
        if doc["kind"] == "ServiceAccount":
            assert doc.get("automountServiceAccountToken") is False
    for name, doc in all_docs(rendered):
        if doc["kind"] not in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            continue
        where = f"{name}: {doc['metadata'].get('namespace')}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        uid = UIDS.get(role(doc), UID) if doc["kind"] != "Job" else UID
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser") == uid, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{where}: hostPath volume {volume['name']}"
        for c in containers(doc):
            sc = c.get("securityContext", {})
            what = f"{where} container {c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == uid, what
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("privileged", False) is False, what
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], what
            assert not sc.get("capabilities", {}).get("add"), what
            for bound in ("requests", "limits"):
                got = c.get("resources", {}).get(bound, {})
                assert {"cpu", "memory"} <= set(got), f"{what}: resources.{bound} {got}"
            image = c["image"]
            assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:[\w.-]+", image), image
            assert not image.endswith(":latest"), what
            # writable places are explicit volumes (read-only root filesystem)
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{what}: no writable /tmp"


def test_images_commands_and_roles(rendered):
    for name, item in rendered.items():
        for doc in workloads(item["docs"]):
            r = role(doc)
            (c,) = pod_spec(doc)["containers"]
            assert c["image"] == IMAGES[r], (name, r, c["image"])
            assert c["command"] == ["federimed"] and c["args"] == COMMANDS[r], (name, r)


def test_settings_are_valid_for_the_cli(rendered, monkeypatch):
    """Every FEDERIMED_* variable that compose or a manifest sets is a setting of the component
    its container runs (federimed/settings.py), and with the image's ENV every value parses."""
    images = dockerfile_env()
    for where, stage, env in components(rendered):
        extra = EXTRA_VARIABLES.get(stage.split(":")[0], {})
        known = {
            (m.model_config["env_prefix"] + field).upper()
            for m in MODELS[stage]
            for field in m.model_fields
        } | set(extra)
        image = f"docker/Dockerfile {stage}"
        checks = [(where, set(env))]
        if ":" not in stage:  # a side command's image is checked under the image's own stage
            checks.append((image, set(images[stage])))
        for source, names in checks:
            ours = {k for k in names if k.startswith("FEDERIMED_")}
            assert ours <= known, f"{source}: unknown settings {sorted(ours - known)}"
        for model in MODELS[stage]:
            load(model, {**images[stage], **env}, monkeypatch)  # raises naming the variable
        for key, check in extra.items():
            value = env.get(key)
            assert value is None or check(value), f"{where}: {key}={value!r} is not valid"
    for variant, services in compose_variants().items():
        for name, service in services.items():
            if "entrypoint" in service and not _compose_side_command(service):
                ours = sorted(k for k in compose_env(service) if k.startswith("FEDERIMED_"))
                assert not ours, f"{variant}: {name} is a one-shot; it reads no settings: {ours}"


def test_deployments_set_only_what_differs(rendered):
    """No value repeats the image's ENV or the settings' default (nor does the image)."""
    images = dockerfile_env()
    problems = []
    for stage in MODELS:
        for key, value in images[stage].items():
            field = setting_field(stage, key)
            if field and not field.is_required() and parsed(stage, key, value) == field.default:
                problems.append(f"docker/Dockerfile {stage}: {key}={value} is the default")
    for where, stage, env in components(rendered):
        for key, value in env.items():
            field = setting_field(stage, key)
            if value is None or field is None:
                continue  # passed through from the shell (compose), or not a setting (above)
            ours = parsed(stage, key, value)
            if key in images[stage] and ours == parsed(stage, key, images[stage][key]):
                problems.append(f"{where}: {key}={value} is the image's already ({stage})")
            elif not field.is_required() and ours == field.default:
                problems.append(f"{where}: {key}={value} is the settings' default")
    assert not problems, "set only what differs per deployment:\n" + "\n".join(problems)


def test_fixed_environment_is_in_the_images_only():
    images = dockerfile_env()
    for stage in (stage for stage, models in MODELS.items() if models):  # FederiMed's own
        wrong = {k: images[stage].get(k) for k, v in FIXED_ENV.items() if images[stage].get(k) != v}
        assert not wrong, f"docker/Dockerfile target {stage}: want {FIXED_ENV}, has {wrong}"
    files = [ROOT / "compose.yaml", *(ROOT / f for f in COMPOSE_OVERRIDES), *K8S.rglob("*.yaml")]
    for path in files:
        text = path.read_text()
        for key in FIXED_ENV:
            assert key not in text, f"{path.relative_to(ROOT)}: {key} is the images' (Dockerfile)"


# --------------------------------------------------------------------------- components


def test_superlink_and_serverapp(rendered, monkeypatch):
    for name in ("consortium", "example-three-hospitals"):
        docs = rendered[name]["docs"]
        link = find(docs, "Deployment", "superlink", "consortium")
        assert link["spec"]["replicas"] == 1
        assert link["spec"]["strategy"]["type"] == "Recreate"
        conf = effective(link, docs, settings.SuperLinkSettings, monkeypatch)
        assert conf.isolation == "process"
        assert conf.node_auth is True
        assert conf.port == 8000
        assert conf.host == "0.0.0.0"
        (c,) = pod_spec(link)["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] == "/health" and get["scheme"] == "HTTPS", probe
            assert get["port"] in (8000, "https")
        assert {"name": "https", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
        # state on a claim, at the database's folder
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(link)["volumes"]}
        db_dir = conf.database.parent.as_posix()
        assert "persistentVolumeClaim" in volumes[mounts[db_dir]]
        find(
            docs,
            "PersistentVolumeClaim",
            volumes[mounts[db_dir]]["persistentVolumeClaim"]["claimName"],
            "consortium",
        )
        # TLS files come from a Secret / ConfigMap mounted read-only
        certs = {p.parent.as_posix() for p in (conf.ca_cert, conf.cert, conf.key)}
        (cert_dir,) = certs
        cert_volume = volumes[mounts[cert_dir]]
        sources = cert_volume.get("projected", {}).get("sources", [cert_volume])
        assert any("secret" in s for s in sources), "the server key must come from a Secret"
        svc = find(docs, "Service", "superlink", "consortium")
        assert [p["port"] for p in svc["spec"]["ports"]] == [8000]

        runner = find(docs, "Deployment", "serverapp", "consortium")
        rconf = effective(runner, docs, settings.SuperExecSettings, monkeypatch)
        assert rconf.runtime_api == "superlink:8000"
        assert rconf.ca_cert is not None and rconf.ca_cert.name == "ca.crt"
        rvolumes = {v["name"]: v for v in pod_spec(runner)["volumes"]}
        (rc,) = pod_spec(runner)["containers"]
        rmounts = {m["mountPath"]: m for m in rc["volumeMounts"]}
        # as in compose.yaml: models to /runs (a claim), the common test set from /data (read-only)
        assert "persistentVolumeClaim" in rvolumes[rmounts["/runs"]["name"]]
        assert not rmounts["/runs"].get("readOnly"), "the ServerApp runner writes its models"
        test_volume = rvolumes[rmounts["/data"]["name"]]["persistentVolumeClaim"]
        assert test_volume.get("readOnly") is True and rmounts["/data"].get("readOnly") is True


def hospital_parts(docs, ns):
    return (find(docs, "Deployment", "supernode", ns), find(docs, "Deployment", "clientapp", ns))


def hospital_cases(rendered):
    for name in ("hospital", "hospital-gpu", "example-three-hospitals"):
        docs = rendered[name]["docs"]
        namespaces = hospital_namespaces(docs)
        assert namespaces, f"{name}: no namespace labelled federimed.io/role=hospital"
        for ns in namespaces:
            yield name, docs, ns


def test_hospital_node_and_runner(rendered, monkeypatch):
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        conf = effective(node, docs, settings.SuperNodeSettings, monkeypatch)
        assert conf.isolation == "process"
        assert conf.runtime_host == "0.0.0.0"
        assert conf.runtime_port == 9094
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", conf.name)
        if name == "example-three-hospitals":
            assert conf.name == ns
        svc = find(docs, "Service", "supernode", ns)
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert [p["port"] for p in svc["spec"]["ports"]] == [9094]
        rconf = effective(runner, docs, settings.SuperExecSettings, monkeypatch)
        assert rconf.ca_cert is None, "the node's app API is plaintext, inside the namespace"
        # No DNS in the runner's pod: it reaches its SuperNode by the Service's ClusterIP, from
        # the variable the kubelet sets (Service links on), never by a name.
        (rc,) = pod_spec(runner)["containers"]
        (raw,) = [e["value"] for e in rc["env"] if e["name"] == "FEDERIMED_SUPEREXEC_RUNTIME_API"]
        assert raw == "$(SUPERNODE_SERVICE_HOST):9094", f"{name}/{ns}: {raw}"
        assert pod_spec(runner).get("enableServiceLinks", True) is True, f"{name}/{ns}"
        assert service_at(rconf.runtime_api, docs, ns) == (svc, conf.runtime_port)
        assert target_port(svc, conf.runtime_port, docs) == conf.runtime_port
        # the kubelet sets a Service's variables only in pods created after it: the rendered
        # order (what `kubectl apply -k` creates first) puts the Service before the runner
        assert docs.index(svc) < docs.index(runner), f"{name}/{ns}: Service after the runner"
        # the node key comes from a Secret
        volumes = {v["name"]: v for v in pod_spec(node)["volumes"]}
        (nc,) = pod_spec(node)["containers"]
        mounts = {m["mountPath"]: m for m in nc["volumeMounts"]}
        key_dir = conf.private_key.parent.as_posix()
        assert mounts[key_dir].get("readOnly") is True
        key_volume = volumes[mounts[key_dir]["name"]]
        sources = key_volume.get("projected", {}).get("sources", [key_volume])
        assert any("secret" in s for s in sources)
        # GPU only where asked for, as an extended-resource request + limit; the SuperNode,
        # which shares the runner's node (test_hospital_data_is_read_only), may go there too
        gpus = rc["resources"]["limits"].get("nvidia.com/gpu")
        (nc,) = pod_spec(node)["containers"]
        assert "nvidia.com/gpu" not in nc["resources"]["limits"], f"{name}/{ns}"
        if name == "hospital-gpu":
            assert gpus == 1 and rc["resources"]["requests"].get("nvidia.com/gpu") == 1
            assert pod_spec(runner).get("nodeSelector") and pod_spec(runner).get("tolerations")
            for key in ("nodeSelector", "tolerations"):
                assert pod_spec(node).get(key) == pod_spec(runner)[key], f"{name}/{ns}: {key}"
            device = effective(runner, docs, settings.RuntimeSettings, monkeypatch).device
            assert device == "cuda"
        else:
            assert gpus is None


def test_hospital_data_is_read_only(rendered, monkeypatch):
    """The hospital's data claim is mounted read-only at the node config's data path in the
    ClientApp runner (which trains on it) and in the SuperNode (whose guard counts the cases for
    the floors), and nowhere writable; the two pods share a node, as ReadWriteOnce needs."""
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        conf = effective(node, docs, settings.SuperNodeSettings, monkeypatch)
        data_path = conf.data_path.as_posix()
        data_claims = set()
        for pod in (node, runner):
            where = f"{name}/{ns}: {pod['metadata']['name']}"
            volumes = {v["name"]: v for v in pod_spec(pod)["volumes"]}
            (c,) = pod_spec(pod)["containers"]
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == data_path]
            assert mount.get("readOnly") is True, f"{where}: data mount must be readOnly"
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            assert claim, f"{where}: {data_path} is not the hospital's data claim"
            assert claim.get("readOnly") is True, f"{where}: data volume must be readOnly"
            data_claims.add(claim["claimName"])
        (data_claim,) = data_claims  # the same claim in both
        find(docs, "PersistentVolumeClaim", data_claim, ns)
        # one node for both readers: each requires to be beside pods the other's labels match
        for pod, other in ((node, runner), (runner, node)):
            terms = (
                pod_spec(pod)
                .get("affinity", {})
                .get("podAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution", [])
            )
            assert any(
                t["topologyKey"] == "kubernetes.io/hostname"
                and "namespaces" not in t
                and "namespaceSelector" not in t
                and selects({"spec": {"podSelector": t["labelSelector"]}}, pod_labels(other))
                and selects({"spec": {"podSelector": t["labelSelector"]}}, pod_labels(pod))
                for t in terms
            ), f"{name}/{ns}: {pod['metadata']['name']} is not kept on its peer's node"
        # every mount of the data claim, in any pod of the hospital, is read-only
        for doc in workloads(docs):
            if doc["metadata"].get("namespace") != ns:
                continue
            claims = {
                v["name"]
                for v in pod_spec(doc)["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == data_claim
            }
            for c in containers(doc):
                for m in c.get("volumeMounts", []):
                    if m["name"] in claims:
                        assert m.get("readOnly") is True, (name, ns, doc["metadata"]["name"])


def test_fleet_gateway(rendered, monkeypatch):
    """Wherever a SuperLink runs, the fleet gateway runs beside it: TLS with its own key from a
    Secret, the SuperLink of its namespace behind it, verified by the name in its certificate."""
    for name, docs, ns in consortium_cases(rendered):
        where = f"{name}/{ns}"
        gateway = find(docs, "Deployment", GATEWAY, ns)
        conf = effective(gateway, docs, settings.GatewaySettings, monkeypatch)
        assert conf.host == "0.0.0.0", where
        link_host, link_port = conf.superlink.rsplit(":", 1)
        link_svc = find(docs, "Service", link_host, ns)
        assert link_svc["spec"]["selector"] == {"app.kubernetes.io/name": "superlink"}, where
        assert target_port(link_svc, int(link_port), docs) == 8000, where
        assert conf.superlink_name == "superlink", "the SuperLink certificate's default SAN"
        for path in (conf.ca_cert, conf.cert, conf.key):
            assert mount_of(gateway, path)[0].get("readOnly") is True, f"{where}: {path}"
        assert file_source(gateway, conf.key)[0] == "Secret", "the gateway key is a Secret"
        assert file_source(gateway, conf.ca_cert)[0] == "ConfigMap", "the CA is public"
        writable_volume(gateway, conf.state)  # Caddy writes its config and storage there
        (c,) = pod_spec(gateway)["containers"]
        assert {"name": "https", "containerPort": conf.port, "protocol": "TCP"} in c["ports"]
        get = c["readinessProbe"]["httpGet"]
        assert get["path"] == "/health" and get["scheme"] == "HTTPS", where
        svc = find(docs, "Service", GATEWAY, ns)
        assert svc["spec"]["selector"] == {"app.kubernetes.io/name": GATEWAY}, where
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", where
        assert [target_port(svc, p["port"], docs) for p in svc["spec"]["ports"]] == [conf.port]


def test_hospitals_are_given_the_gateway(rendered, monkeypatch):
    """No hospital's SuperNode is pointed at a SuperLink; in-cluster ones at the gateway's
    Service; and the docs say how to put every address hospitals use into the certificate."""
    docs_text = DOCS.read_text()
    for name, docs, ns in hospital_cases(rendered):
        node, _ = hospital_parts(docs, ns)
        address = effective(node, docs, settings.SuperNodeSettings, monkeypatch).superlink
        host, port = address.rsplit(":", 1)
        where = f"{name}/{ns}: FEDERIMED_NODE_SUPERLINK={address}"
        service = in_cluster_service(host, docs, ns)
        consortium = {c_ns for _, _, c_ns in consortium_cases({name: rendered[name]})}
        if consortium:
            assert service, f"{where}: the consortium runs in this cluster, use its gateway"
            assert service[1] in consortium, where
        if service:
            # a Service of this cluster: the gateway's, never the SuperLink's
            svc = find(docs, "Service", *service)
            selected = svc["spec"]["selector"].get("app.kubernetes.io/name")
            assert selected != "superlink", f"{where} names the SuperLink's Service"
            assert selected == GATEWAY, where
            gateway = find(docs, "Deployment", GATEWAY, service[1])
            gateway_port = effective(gateway, docs, settings.GatewaySettings, monkeypatch).port
            assert target_port(svc, int(port), docs) == gateway_port, where
        # the gateway certificate must carry the name the node connects to
        assert f"--san {host}" in docs_text, f"{where}: docs/kubernetes.md lacks --san {host}"


def test_runtime_api_secret_on_both_ends(rendered, monkeypatch):
    """Every separate app runner and the Runtime API it connects to (the SuperLink's, or its
    SuperNode's) read the same key of the same Secret, mounted read-only."""
    pairs = 0
    for name, item in rendered.items():
        docs = item["docs"]
        for runner in workloads(docs):
            if role(runner) not in ("serverapp", "clientapp"):
                continue
            ns = runner["metadata"]["namespace"]
            rconf = effective(runner, docs, settings.SuperExecSettings, monkeypatch)
            svc, _ = service_at(rconf.runtime_api, docs, ns)
            assert svc["metadata"]["namespace"] == ns, f"{name}/{ns}: another namespace's API"
            peer_role = svc["spec"]["selector"]["app.kubernetes.io/name"]
            peer = find(docs, "Deployment", peer_role, ns)
            model = {
                "superlink": settings.SuperLinkSettings,
                "supernode": settings.SuperNodeSettings,
            }
            pconf = effective(peer, docs, model[peer_role], monkeypatch)
            where = f"{name}/{ns}: {role(runner)} -> {peer_role}"
            assert rconf.auth_secret is not None, f"{where}: the runner presents no secret"
            assert pconf.superexec_auth_secret is not None, f"{where}: the API expects none"
            ours = file_source(runner, rconf.auth_secret)
            theirs = file_source(peer, pconf.superexec_auth_secret)
            assert ours[0] == "Secret" and ours == theirs, f"{where}: {ours} != {theirs}"
            for doc, path in ((runner, rconf.auth_secret), (peer, pconf.superexec_auth_secret)):
                assert mount_of(doc, path)[0].get("readOnly") is True, where
            pairs += 1
    # the ServerApp runner of both consortium overlays, five hospitals' ClientApp runners
    assert pairs >= 2 + 5, pairs


def test_site_policy_and_ledger(rendered, monkeypatch, tmp_path):
    """Every hospital's SuperNode, where the guard runs, reads the hospital's own site policy:
    mounted read-only from a ConfigMap/Secret the manifests do not carry (the hospital creates
    it), and the ledger path the docs tell hospitals to write into it lies on a writable claim
    that no other pod mounts. The ClientApp runner has neither: no policy variable, no policy
    object, no ledger claim."""
    docs_text = DOCS.read_text()
    ledgers = set(re.findall(r"--ledger[ =](/\S+)", docs_text))
    assert ledgers, "docs/kubernetes.md: no `federimed approve ... --ledger /PATH` example"
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        where = f"{name}/{ns}"
        policy = env_of(node, docs).get(POLICY_ENV)
        assert policy and PurePosixPath(policy).is_absolute(), f"{where}: no {POLICY_ENV}"
        mount, _ = mount_of(node, policy)
        assert mount.get("readOnly") is True, f"{where}: the site policy must be read-only"
        kind, obj, key = file_source(node, policy)
        assert kind in ("ConfigMap", "Secret"), where
        shipped = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == obj]
        assert not shipped, f"{where}: the site policy is the hospital's, not the manifests'"
        command = f"create {kind.lower()} {obj}" if kind == "ConfigMap" else f"secret generic {obj}"
        assert command in docs_text and f"{key}=" in docs_text, f"{where}: undocumented {obj}"
        # The ledger: a policy made as the docs say puts it on the SuperNode's writable claim.
        node_name = effective(node, docs, settings.SuperNodeSettings, monkeypatch).name
        data_claim = mount_of(node, "/data")[1]["persistentVolumeClaim"]["claimName"]
        ledger_claims = set()
        for ledger_path in ledgers:
            path = tmp_path / name / ns / "policy.yaml"
            path.unlink(missing_ok=True)
            approve(path, "0" * 64, site=node_name, ledger=ledger_path)
            ledger = load_policy(path).ledger
            volume = writable_volume(node, ledger)
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim, f"{where}: the egress ledger must survive restarts (a claim)"
            find(docs, "PersistentVolumeClaim", claim, ns)
            assert claim != data_claim, f"{where}: the ledger is not the data volume"
            ledger_claims.add(claim)
            # written by the SuperNode only: no other pod of the hospital mounts the claim
            for doc in workloads(docs):
                if doc["metadata"]["namespace"] == ns and doc is not node:
                    claims = {
                        v.get("persistentVolumeClaim", {}).get("claimName")
                        for v in pod_spec(doc)["volumes"]
                    }
                    assert claim not in claims, f"{where}: {doc['metadata']['name']}"
        # The runner, where the consortium's code runs: no policy, no ledger; its only claim is
        # the data, read-only (test_hospital_data_is_read_only).
        assert POLICY_ENV not in env_of(runner, docs), f"{where}: the runner reads no policy"
        for volume in pod_spec(runner)["volumes"]:
            sources = volume.get("projected", {}).get("sources", [volume])
            for source in sources:
                ref = source.get("configMap") or source.get("secret") or {}
                assert (ref.get("name") or ref.get("secretName")) != obj, (
                    f"{where}: the runner mounts the site policy ({volume['name']})"
                )
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim in (None, data_claim), f"{where}: the runner mounts claim {claim}"
            assert claim not in ledger_claims, where
        (rc,) = pod_spec(runner)["containers"]
        mounted = {m["mountPath"] for m in rc["volumeMounts"]}
        for path in (policy, *ledgers):
            assert not any(
                PurePosixPath(path) == PurePosixPath(m)
                or PurePosixPath(m) in PurePosixPath(path).parents
                for m in mounted
                if m != "/"
            ), f"{where}: the runner has a mount at {path}"


def test_the_runner_is_another_user(rendered):
    """The ClientApp runner runs as another user and group than its SuperNode (pod and
    container), and its volumes get its own fsGroup: no file the SuperNode writes (the ledger,
    its home) is the runner's by owner or group."""
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        where = f"{name}/{ns}"

        def ids(doc):
            pod_sc = pod_spec(doc)["securityContext"]
            (c,) = pod_spec(doc)["containers"]
            sc = c.get("securityContext", {})
            user = sc.get("runAsUser", pod_sc.get("runAsUser"))
            group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
            groups = {group, pod_sc.get("fsGroup"), *pod_sc.get("supplementalGroups", [])}
            return user, groups - {None}

        node_user, node_groups = ids(node)
        runner_user, runner_groups = ids(runner)
        assert (node_user, runner_user) == (UID, RUNNER_UID), where
        assert runner_user not in node_groups | {node_user}, where
        assert not runner_groups & (node_groups | {node_user}), f"{where}: shared group"


def test_no_secret_material_in_manifests(rendered):
    for name, item in rendered.items():
        assert not of_kind(item["docs"], "Secret"), f"{name}: Secrets are created with kubectl"
        text = item["text"]
        for marker in ("PRIVATE KEY", "BEGIN CERTIFICATE", "ecdsa-sha2-nistp384", "BEGIN OPENSSH"):
            assert marker not in text, f"{name}: {marker!r} inlined in the manifests"
        for cm in of_kind(item["docs"], "ConfigMap"):
            assert "ca.crt" not in cm.get("data", {}), "the CA is created with kubectl"
            assert not cm.get("binaryData")


# --------------------------------------------------------------------------- network policies


def selects(policy, labels) -> bool:
    selector = policy["spec"]["podSelector"]
    assert "matchExpressions" not in selector, "this test reads matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def egress_beyond_dns(docs, ns, labels, where):
    """The egress rules of an isolated pod other than DNS (whose rule is checked here)."""
    isolated, egress = rules_for(docs, ns, labels, "egress")
    assert isolated and egress, where
    rules = []
    for rule in egress:
        if all(is_dns_peer(p) for p in rule.get("to", [{}])):
            assert_dns_rule(rule, where)
        else:
            rules.append(rule)
    return rules


def rules_for(docs, ns, labels, direction):
    """All rules that apply to a pod (policies are additive) and whether it is isolated."""
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["namespace"] == ns and selects(p, labels)
    ]
    kind = direction.capitalize()
    isolated = any(kind in p["spec"].get("policyTypes", []) for p in policies)
    return isolated, [r for p in policies for r in p["spec"].get(direction, []) or []]


def is_dns_peer(peer) -> bool:
    return peer.get("namespaceSelector", {}).get("matchLabels") == {
        "kubernetes.io/metadata.name": "kube-system"
    } and peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}


def rule_ports(rule) -> set[tuple[int, str]]:
    ports = rule.get("ports")
    assert ports, f"a rule without ports allows every port: {rule}"
    return {(p["port"], p.get("protocol", "TCP")) for p in ports}


def assert_dns_rule(rule, where):
    assert rule.get("to") and all(is_dns_peer(p) for p in rule["to"]), where
    assert rule_ports(rule) <= {(DNS_PORT, "UDP"), (DNS_PORT, "TCP")}, where


def test_default_deny_everywhere(rendered):
    for name, item in rendered.items():
        docs = item["docs"]
        for ns in (d["metadata"]["name"] for d in of_kind(docs, "Namespace")):
            deny = [
                p
                for p in of_kind(docs, "NetworkPolicy")
                if p["metadata"]["namespace"] == ns and p["spec"]["podSelector"] == {}
            ]
            assert deny, f"{name}: no default-deny policy in {ns}"
            assert any(
                set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                and not p["spec"].get("ingress")
                and not p["spec"].get("egress")
                for p in deny
            ), f"{name}: {ns}: default-deny must deny both directions"
        for doc in workloads(docs):
            ns = doc["metadata"]["namespace"]
            assert any(d["metadata"]["name"] == ns for d in of_kind(docs, "Namespace")), (
                f"{name}: namespace {ns} is not part of the overlay"
            )


def peer_matches(peer, policy_ns, source_ns_labels, source_labels) -> bool:
    """Whether a NetworkPolicy peer (namespaceSelector/podSelector, matchLabels) names a pod."""
    if "ipBlock" in peer:
        return False
    for selector in (peer.get("namespaceSelector"), peer.get("podSelector")):
        assert "matchExpressions" not in (selector or {}), "this test reads matchLabels only"
    ns_selector = peer.get("namespaceSelector")
    if ns_selector is None:
        ns_ok = source_ns_labels["kubernetes.io/metadata.name"] == policy_ns
    else:
        ns_ok = all(
            source_ns_labels.get(k) == v for k, v in ns_selector.get("matchLabels", {}).items()
        )
    pod_selector = peer.get("podSelector", {}).get("matchLabels", {})
    return ns_ok and all(source_labels.get(k) == v for k, v in pod_selector.items())


def admits(docs, target, source, port: int) -> bool:
    """Whether the ingress policies of workload `target` admit workload `source` on `port`."""
    ns = target["metadata"]["namespace"]
    isolated, rules = rules_for(docs, ns, pod_labels(target), "ingress")
    if not isolated:
        return True
    source_ns = namespace_labels(docs, source["metadata"]["namespace"])
    for rule in rules:
        if rule.get("ports") and (port, "TCP") not in rule_ports(rule):
            continue
        peers = rule.get("from")
        if not peers or any(peer_matches(p, ns, source_ns, pod_labels(source)) for p in peers):
            return True
    return False


def test_hospital_network_policies(rendered, monkeypatch):
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        node_labels = pod_labels(node)
        runner_labels = pod_labels(runner)
        address = effective(node, docs, settings.SuperNodeSettings, monkeypatch).superlink
        host, port = address.rsplit(":", 1)
        # An in-cluster gateway is reached on its container port (policies see pods, not
        # Services); one outside the cluster on the port of its address.
        service = in_cluster_service(host, docs, ns)
        if service:
            gateway_port = target_port(find(docs, "Service", *service), int(port), docs)
        else:
            gateway_port = int(port)
        where = f"{name}/{ns}"

        # SuperNode egress: DNS + the gateway's port, to the gateway only, nothing else.
        seen_gateway = False
        for rule in egress_beyond_dns(docs, ns, node_labels, where):
            assert rule_ports(rule) == {(gateway_port, "TCP")}, f"{where}: {rule}"
            assert rule.get("to"), f"{where}: egress to anywhere"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert not service, f"{where}: an IP range for an in-cluster gateway"
                    cidr = peer["ipBlock"]["cidr"]
                    assert not cidr.endswith("/0") and not peer["ipBlock"].get("except"), cidr
                else:
                    assert peer.get("podSelector", {}).get("matchLabels") == {
                        "app.kubernetes.io/name": GATEWAY
                    }, f"{where}: hospitals may reach the fleet gateway only: {peer}"
                    assert peer.get("namespaceSelector", {}).get("matchLabels"), where
            seen_gateway = True
        assert seen_gateway, f"{where}: the SuperNode cannot reach the fleet gateway"

        # SuperNode ingress: only its ClientApp runner, only on 9094.
        isolated, ingress = rules_for(docs, ns, node_labels, "ingress")
        assert isolated and ingress, where
        for rule in ingress:
            assert rule_ports(rule) == {(9094, "TCP")}, where
            assert rule.get("from"), f"{where}: 9094 open to everybody"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{where}: only pods of this namespace"
                assert selects({"spec": peer}, runner_labels), where
                assert not selects({"spec": peer}, node_labels), where

        # ClientApp runner: talks to its SuperNode's runtime port and nothing else, not even
        # DNS (kube-dns answers outside names: a tunnel out); admits nothing.
        runtime_port = effective(node, docs, settings.SuperNodeSettings, monkeypatch).runtime_port
        isolated, egress = rules_for(docs, ns, runner_labels, "egress")
        assert isolated and egress, f"{where}: the runner cannot reach its SuperNode"
        for rule in egress:
            assert rule_ports(rule) == {(runtime_port, "TCP")}, f"{where}: {rule}"
            assert rule.get("to"), f"{where}: egress to anywhere on {runtime_port}"
            for peer in rule["to"]:
                assert not is_dns_peer(peer), f"{where}: the runner may ask DNS"
                assert set(peer) == {"podSelector"}, f"{where}: only pods of this namespace"
                assert peer["podSelector"].get("matchLabels"), f"{where}: every pod: {peer}"
                assert selects({"spec": peer}, node_labels), f"{where}: {peer}"
                assert not selects({"spec": peer}, runner_labels), f"{where}: {peer}"
        isolated, ingress = rules_for(docs, ns, runner_labels, "ingress")
        assert isolated and not ingress, f"{where}: nothing may connect to the ClientApp runner"

        # Where the consortium runs in the same cluster: its gateway admits this SuperNode (and
        # not the runner next to the patient data); its SuperLink admits neither.
        if service:
            gateway = find(docs, "Deployment", GATEWAY, service[1])
            link = find(docs, "Deployment", "superlink", service[1])
            assert admits(docs, gateway, node, gateway_port), f"{where}: gateway refuses node"
            assert not admits(docs, gateway, runner, gateway_port), where
            for pod in (node, runner):
                assert not admits(docs, link, pod, 8000), f"{where}: reaches the SuperLink"


def test_superlink_network_policy(rendered):
    cases = list(consortium_cases(rendered))
    assert {name for name, _, _ in cases} >= {"consortium", "example-three-hospitals"}
    for name, docs, ns in cases:
        where = f"{name}/{ns}"
        link = find(docs, "Deployment", "superlink", ns)
        labels = pod_labels(link)
        isolated, egress = rules_for(docs, ns, labels, "egress")
        assert isolated and not egress, "the SuperLink opens no connections"
        isolated, ingress = rules_for(docs, ns, labels, "ingress")
        assert isolated and ingress
        for rule in ingress:
            assert rule_ports(rule) == {(8000, "TCP")}
            assert rule.get("from"), "port 8000 open to everybody"
            for peer in rule["from"]:
                # the consortium's own pods only: no other namespace, no address range
                assert set(peer) == {"podSelector"}, f"{where}: {peer}"
                pod_sel = peer["podSelector"].get("matchLabels", {})
                assert set(pod_sel) == {"app.kubernetes.io/name"}, f"{where}: {peer}"
                assert pod_sel["app.kubernetes.io/name"] in SUPERLINK_PEERS, f"{where}: {peer}"
        for peer_role in ("serverapp", GATEWAY):
            peer = find(docs, "Deployment", peer_role, ns)
            assert admits(docs, link, peer, 8000), f"{where}: {peer_role} cannot reach it"
        # the consortium namespace is no hospital; the example's hospitals are labelled
        assert namespace_labels(docs, ns).get("federimed.io/role") != "hospital"
        if name == "example-three-hospitals":
            assert hospital_namespaces(docs) == ["hospital-1", "hospital-2", "hospital-3"]


def test_gateway_network_policy(rendered, monkeypatch):
    for name, docs, ns in consortium_cases(rendered):
        where = f"{name}/{ns}"
        gateway = find(docs, "Deployment", GATEWAY, ns)
        labels = pod_labels(gateway)
        port = effective(gateway, docs, settings.GatewaySettings, monkeypatch).port
        # Ingress: hospitals only. In-cluster ones by namespace label, their SuperNode pods
        # only; outside ones by address range, never the whole internet.
        isolated, ingress = rules_for(docs, ns, labels, "ingress")
        assert isolated and ingress, where
        for rule in ingress:
            assert rule_ports(rule) == {(port, "TCP")}, f"{where}: {rule}"
            assert rule.get("from"), f"{where}: the gateway open to everybody"
            for peer in rule["from"]:
                if "ipBlock" in peer:
                    assert set(peer) == {"ipBlock"}, peer
                    cidr = peer["ipBlock"]["cidr"]
                    assert not cidr.endswith("/0") and not peer["ipBlock"].get("except"), cidr
                    continue
                assert peer.get("namespaceSelector", {}).get("matchLabels") == {
                    "federimed.io/role": "hospital"
                }, f"{where}: {peer}"
                assert peer.get("podSelector", {}).get("matchLabels") == {
                    "app.kubernetes.io/name": "supernode"
                }, f"{where}: hospitals' SuperNodes only, never their ClientApp runners"
        # Egress: the SuperLink of its namespace on its port, and DNS to find it.
        for rule in egress_beyond_dns(docs, ns, labels, where):
            assert rule_ports(rule) == {(8000, "TCP")}, f"{where}: {rule}"
            assert rule.get("to") == [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "superlink"}}}
            ], f"{where}: {rule}"


def test_only_the_gateway_is_exposed(rendered):
    """Nothing but the gateway leaves the cluster network, and only for the hospitals' ranges,
    the same in the load balancer and in the gateway's NetworkPolicy."""
    for name, item in rendered.items():
        docs = item["docs"]
        assert not of_kind(docs, "Ingress"), f"{name}: hospitals come in through the gateway"
        for svc in of_kind(docs, "Service"):
            spec = svc["spec"]
            where = f"{name}: Service {svc['metadata']['name']}"
            assert not spec.get("externalIPs"), where
            if spec.get("type", "ClusterIP") == "ClusterIP":
                continue
            assert spec["type"] == "LoadBalancer", f"{where}: {spec['type']}"
            assert spec["selector"] == {"app.kubernetes.io/name": GATEWAY}, where
            # the hospitals' own addresses reach the pods (for the NetworkPolicy)
            assert spec.get("externalTrafficPolicy") == "Local", where
            ranges = spec.get("loadBalancerSourceRanges")
            assert ranges and not any(r.endswith("/0") for r in ranges), f"{where}: {ranges}"
            ns = svc["metadata"]["namespace"]
            gateway = find(docs, "Deployment", GATEWAY, ns)
            _, ingress = rules_for(docs, ns, pod_labels(gateway), "ingress")
            cidrs = {p["ipBlock"]["cidr"] for r in ingress for p in r["from"] if "ipBlock" in p}
            assert cidrs == set(ranges), f"{where}: policy admits {cidrs}, the LB {ranges}"
            for entry in spec["ports"]:
                port = target_port(svc, entry["port"], docs)
                assert all((port, "TCP") in rule_ports(r) for r in ingress), where
    consortium = rendered["consortium"]["docs"]
    assert [s for s in of_kind(consortium, "Service") if s["spec"].get("type") == "LoadBalancer"], (
        "the consortium overlay publishes the gateway for hospitals outside its cluster"
    )
