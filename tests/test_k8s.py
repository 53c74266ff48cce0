"""The Kubernetes manifests (k8s/) render, validate and say what the docs promise.

Offline only: `kubectl kustomize` renders every overlay, `kubernetes-validate --strict` checks
every object against the API schemas of a pinned Kubernetes version, `checkov` runs once over
all rendered overlays, and the assertions below check what no generic tool knows about this
project (who may talk to whom, read-only data, the same settings as compose.yaml).

The tools live in their own venv, .venv-k8s (checkov pins many heavy dependencies):
    python3 -m venv .venv-k8s && .venv-k8s/bin/pip install -r requirements-k8s.txt
They are looked up there first, then on PATH. A missing tool is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = K8S / "overlays"
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
# Image names follow compose.yaml / docker/Dockerfile (targets superlink, supernode, superexec);
# the tag is the release, pinned (never :latest).
IMAGES = {
    "superlink": "federimed/superlink:0.1.0",
    "supernode": "federimed/supernode:0.1.0",
    "serverapp": "federimed/superexec:0.1.0",
    "clientapp": "federimed/superexec:0.1.0",
}
COMMANDS = {
    "superlink": ["superlink"],
    "supernode": ["supernode"],
    "serverapp": ["superexec"],
    "clientapp": ["superexec"],
}
HARDENED_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
}
ROLE_PREFIX = {
    "superlink": "FEDERIMED_SUPERLINK_",
    "supernode": "FEDERIMED_NODE_",
    "serverapp": "FEDERIMED_SUPEREXEC_",
    "clientapp": "FEDERIMED_SUPEREXEC_",
}
DNS_PORT = 53


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
    """The container's effective plain env: envFrom ConfigMaps first, then env (wins)."""
    (container,) = pod_spec(doc)["containers"]
    ns = doc["metadata"].get("namespace")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "settings must not come from Secrets via env"
        cm = find(docs, "ConfigMap", source["configMapRef"]["name"], ns)
        env.update({k: str(v) for k, v in cm.get("data", {}).items()})
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are expected"
        env[item["name"]] = str(item["value"])
    return env


def role(doc) -> str:
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


def hospital_namespaces(docs) -> list[str]:
    return sorted(
        d["metadata"]["name"]
        for d in of_kind(docs, "Namespace")
        if d["metadata"].get("labels", {}).get("federimed.io/role") == "hospital"
    )


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
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser") == UID, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{where}: hostPath volume {volume['name']}"
        for c in containers(doc):
            sc = c.get("securityContext", {})
            what = f"{where} container {c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == UID, what
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
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for key, value in HARDENED_ENV.items():
                assert env.get(key) == value, f"{what}: {key} must be {value}"


def test_images_commands_and_roles(rendered):
    for name, item in rendered.items():
        for doc in workloads(item["docs"]):
            r = role(doc)
            (c,) = pod_spec(doc)["containers"]
            assert c["image"] == IMAGES[r], (name, r, c["image"])
            assert c["command"] == ["federimed"] and c["args"] == COMMANDS[r], (name, r)


def test_settings_are_valid_for_the_cli(rendered, monkeypatch):
    """Every FEDERIMED_* name exists in federimed/settings.py and every value parses there."""
    from federimed import settings  # the project's own settings: the names compose/CLI use

    models = {
        "superlink": [settings.SuperLinkSettings],
        "supernode": [settings.SuperNodeSettings],
        "serverapp": [settings.SuperExecSettings, settings.RuntimeSettings],
        "clientapp": [settings.SuperExecSettings, settings.RuntimeSettings],
    }
    for name, item in rendered.items():
        docs = item["docs"]
        for doc in workloads(docs):
            r = role(doc)
            env = env_of(doc, docs)
            known = {
                (m.model_config["env_prefix"] + field).upper()
                for m in models[r]
                for field in m.model_fields
            }
            ours = {k for k in env if k.startswith("FEDERIMED_")}
            assert ours <= known, f"{name}/{r}: unknown settings {sorted(ours - known)}"
            for key in list(os.environ):
                if key.startswith("FEDERIMED_"):
                    monkeypatch.delenv(key)
            for key in ours:
                monkeypatch.setenv(key, env[key])
            for model in models[r]:
                model()  # raises with the variable's name if a value is invalid


# --------------------------------------------------------------------------- components


def test_superlink_and_serverapp(rendered):
    for name in ("consortium", "example-three-hospitals"):
        docs = rendered[name]["docs"]
        link = find(docs, "Deployment", "superlink", "consortium")
        assert link["spec"]["replicas"] == 1
        assert link["spec"]["strategy"]["type"] == "Recreate"
        env = env_of(link, docs)
        assert env["FEDERIMED_SUPERLINK_ISOLATION"] == "process"
        assert env["FEDERIMED_SUPERLINK_NODE_AUTH"].lower() in {"true", "1"}
        assert env["FEDERIMED_SUPERLINK_PORT"] == "8000"
        assert env["FEDERIMED_SUPERLINK_HOST"] == "0.0.0.0"
        (c,) = pod_spec(link)["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] == "/health" and get["scheme"] == "HTTPS", probe
            assert get["port"] in (8000, "https")
        assert {"name": "https", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
        # state on a claim, at the database's folder
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(link)["volumes"]}
        db_dir = str(Path(env["FEDERIMED_SUPERLINK_DATABASE"]).parent)
        assert "persistentVolumeClaim" in volumes[mounts[db_dir]]
        find(
            docs,
            "PersistentVolumeClaim",
            volumes[mounts[db_dir]]["persistentVolumeClaim"]["claimName"],
            "consortium",
        )
        # TLS files come from a Secret / ConfigMap mounted read-only
        certs = {
            Path(env[k]).parent.as_posix()
            for k in (
                "FEDERIMED_SUPERLINK_CA_CERT",
                "FEDERIMED_SUPERLINK_CERT",
                "FEDERIMED_SUPERLINK_KEY",
            )
        }
        (cert_dir,) = certs
        cert_volume = volumes[mounts[cert_dir]]
        sources = cert_volume.get("projected", {}).get("sources", [cert_volume])
        assert any("secret" in s for s in sources), "the server key must come from a Secret"
        svc = find(docs, "Service", "superlink", "consortium")
        assert [p["port"] for p in svc["spec"]["ports"]] == [8000]

        runner = find(docs, "Deployment", "serverapp", "consortium")
        renv = env_of(runner, docs)
        assert renv["FEDERIMED_SUPEREXEC_RUNTIME_API"] == "superlink:8000"
        assert renv["FEDERIMED_SUPEREXEC_CA_CERT"].endswith("ca.crt")
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


def test_hospital_node_and_runner(rendered):
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        env = env_of(node, docs)
        assert env["FEDERIMED_NODE_ISOLATION"] == "process"
        assert env["FEDERIMED_NODE_RUNTIME_HOST"] == "0.0.0.0"
        assert env["FEDERIMED_NODE_RUNTIME_PORT"] == "9094"
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", env["FEDERIMED_NODE_NAME"])
        if name == "example-three-hospitals":
            assert env["FEDERIMED_NODE_NAME"] == ns
        svc = find(docs, "Service", "supernode", ns)
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert [p["port"] for p in svc["spec"]["ports"]] == [9094]
        renv = env_of(runner, docs)
        assert renv["FEDERIMED_SUPEREXEC_RUNTIME_API"] == "supernode:9094"
        # the node key comes from a Secret
        volumes = {v["name"]: v for v in pod_spec(node)["volumes"]}
        (nc,) = pod_spec(node)["containers"]
        mounts = {m["mountPath"]: m for m in nc["volumeMounts"]}
        key_dir = Path(env["FEDERIMED_NODE_PRIVATE_KEY"]).parent.as_posix()
        assert mounts[key_dir].get("readOnly") is True
        key_volume = volumes[mounts[key_dir]["name"]]
        sources = key_volume.get("projected", {}).get("sources", [key_volume])
        assert any("secret" in s for s in sources)
        # GPU only where asked for, as an extended-resource request + limit
        (rc,) = pod_spec(runner)["containers"]
        gpus = rc["resources"]["limits"].get("nvidia.com/gpu")
        if name == "hospital-gpu":
            assert gpus == 1 and rc["resources"]["requests"].get("nvidia.com/gpu") == 1
            assert pod_spec(runner).get("nodeSelector") and pod_spec(runner).get("tolerations")
            assert renv["FEDERIMED_DEVICE"] == "cuda"
        else:
            assert gpus is None


def test_hospital_data_is_read_only(rendered):
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        data_path = env_of(node, docs)["FEDERIMED_NODE_DATA_PATH"]
        volumes = {v["name"]: v for v in pod_spec(runner)["volumes"]}
        (rc,) = pod_spec(runner)["containers"]
        (mount,) = [m for m in rc["volumeMounts"] if m["mountPath"] == data_path]
        assert mount.get("readOnly") is True, f"{name}/{ns}: data mount must be readOnly"
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim.get("readOnly") is True, f"{name}/{ns}: data volume must be readOnly"
        find(docs, "PersistentVolumeClaim", claim["claimName"], ns)
        # every mount of the data claim, in any pod of the hospital, is read-only
        for doc in workloads(docs):
            if doc["metadata"].get("namespace") != ns:
                continue
            claims = {
                v["name"]
                for v in pod_spec(doc)["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == claim["claimName"]
            }
            for c in containers(doc):
                for m in c.get("volumeMounts", []):
                    if m["name"] in claims:
                        assert m.get("readOnly") is True, (name, ns, doc["metadata"]["name"])


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


def test_hospital_network_policies(rendered):
    for name, docs, ns in hospital_cases(rendered):
        node, runner = hospital_parts(docs, ns)
        node_labels = node["spec"]["template"]["metadata"]["labels"]
        runner_labels = runner["spec"]["template"]["metadata"]["labels"]
        superlink_port = int(env_of(node, docs)["FEDERIMED_NODE_SUPERLINK"].rsplit(":", 1)[1])
        where = f"{name}/{ns}"

        # SuperNode egress: DNS + the SuperLink's port, to a specific peer, nothing else.
        isolated, egress = rules_for(docs, ns, node_labels, "egress")
        assert isolated, where
        seen_link = False
        for rule in egress:
            if all(is_dns_peer(p) for p in rule.get("to", [{}])):
                assert_dns_rule(rule, where)
                continue
            assert rule_ports(rule) == {(superlink_port, "TCP")}, f"{where}: {rule}"
            assert rule.get("to"), f"{where}: SuperLink egress to anywhere"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    cidr = peer["ipBlock"]["cidr"]
                    assert not cidr.endswith("/0") and not peer["ipBlock"].get("except"), cidr
                else:
                    assert peer.get("podSelector", {}).get("matchLabels") == {
                        "app.kubernetes.io/name": "superlink"
                    }, f"{where}: {peer}"
                    assert peer.get("namespaceSelector", {}).get("matchLabels"), where
            seen_link = True
        assert seen_link, f"{where}: the SuperNode cannot reach the SuperLink"

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

        # ClientApp runner: talks only to its SuperNode (and DNS to find it); admits nothing.
        isolated, egress = rules_for(docs, ns, runner_labels, "egress")
        assert isolated and egress, where
        for rule in egress:
            if all(is_dns_peer(p) for p in rule.get("to", [{}])):
                assert_dns_rule(rule, where)
                continue
            assert rule_ports(rule) == {(9094, "TCP")}, where
            assert rule.get("to") and all(set(p) == {"podSelector"} for p in rule["to"]), where
            assert all(selects({"spec": p}, node_labels) for p in rule["to"]), where
        isolated, ingress = rules_for(docs, ns, runner_labels, "ingress")
        assert isolated and not ingress, f"{where}: nothing may connect to the ClientApp runner"


def test_superlink_network_policy(rendered):
    for name in ("consortium", "example-three-hospitals"):
        docs = rendered[name]["docs"]
        link = find(docs, "Deployment", "superlink", "consortium")
        labels = link["spec"]["template"]["metadata"]["labels"]
        isolated, egress = rules_for(docs, "consortium", labels, "egress")
        assert isolated and not egress, "the SuperLink opens no connections"
        isolated, ingress = rules_for(docs, "consortium", labels, "ingress")
        assert isolated and ingress
        for rule in ingress:
            assert rule_ports(rule) == {(8000, "TCP")}
            assert rule.get("from"), "port 8000 open to everybody"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, peer
                ns_sel = peer.get("namespaceSelector")
                pod_sel = peer.get("podSelector", {}).get("matchLabels")
                assert pod_sel, f"every peer names its pods: {peer}"
                if ns_sel is None:  # same namespace: the ServerApp runner only
                    assert pod_sel == {"app.kubernetes.io/name": "serverapp"}, peer
                elif ns_sel.get("matchLabels") == {"federimed.io/role": "hospital"}:
                    # hospital namespaces: their SuperNode only, never their ClientApp runner
                    assert pod_sel == {"app.kubernetes.io/name": "supernode"}, peer
                else:
                    assert ns_sel.get("matchLabels") == {
                        "kubernetes.io/metadata.name": "ingress-nginx"
                    }, peer
        # the consortium namespace is no hospital; the example's hospitals are labelled
        consortium = find(docs, "Namespace", "consortium")
        assert consortium["metadata"]["labels"].get("federimed.io/role") != "hospital"
        if name == "example-three-hospitals":
            assert hospital_namespaces(docs) == ["hospital-1", "hospital-2", "hospital-3"]

    # Outside hospitals come through the gateway, which routes Fleet (and /health) only.
    docs = rendered["consortium"]["docs"]
    (ingress,) = of_kind(docs, "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert {p["path"] for p in paths} == {"/v1/fleet/", "/health"}
    assert ingress["spec"]["tls"], "the gateway terminates TLS"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    assert annotations["nginx.ingress.kubernetes.io/proxy-ssl-verify"] == "on"


# --------------------------------------------------------------------------- compose agreement

COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
# Values that must be equal in both (the rest are host names, which differ per deployment:
# for those only the port must agree).
SAME_VALUE = {
    "FEDERIMED_SUPERLINK_HOST",
    "FEDERIMED_SUPERLINK_PORT",
    "FEDERIMED_SUPERLINK_NODE_AUTH",
    "FEDERIMED_SUPERLINK_ISOLATION",
    "FEDERIMED_SUPERLINK_CA_CERT",
    "FEDERIMED_SUPERLINK_CERT",
    "FEDERIMED_SUPERLINK_KEY",
    "FEDERIMED_SUPERLINK_DATABASE",
    "FEDERIMED_NODE_NAME",
    "FEDERIMED_NODE_ISOLATION",
    "FEDERIMED_NODE_RUNTIME_HOST",
    "FEDERIMED_NODE_RUNTIME_PORT",
    "FEDERIMED_NODE_CA_CERT",
    "FEDERIMED_NODE_PRIVATE_KEY",
    "FEDERIMED_NODE_DATA_PATH",
    "FEDERIMED_SUPEREXEC_CA_CERT",
    "FEDERIMED_TORCH_THREADS",
    "FEDERIMED_DEVICE",
}
SAME_PORT = {"FEDERIMED_NODE_SUPERLINK", "FEDERIMED_SUPEREXEC_RUNTIME_API"}


def compose_value(value) -> str:
    """Compose interpolation with the defaults written in the file (not this shell's env)."""
    return COMPOSE_VAR.sub(lambda m: m.group(2) or "", str(value))


def normalize(key, value):
    value = compose_value(value)
    if key.endswith("NODE_AUTH"):
        return {
            "1": "true",
            "yes": "true",
            "on": "true",
            "0": "false",
            "no": "false",
            "off": "false",
        }.get(value.lower(), value.lower())
    return value


def compose_env(service) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: normalize(k, v) for k, v in env.items() if v is not None}


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """stage -> {"entrypoint": [...], "cmd": [...]}, following `FROM <stage>` inheritance."""
    stages: dict[str, dict] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text()) if path.is_file() else ""
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            parent = stages.get(m.group(1), {"entrypoint": [], "cmd": []})
            current = dict(parent)
            stages[m.group(2) or f"_{len(stages)}"] = current
        elif current is not None and (m := re.match(r"(ENTRYPOINT|CMD)\s+(\[.*\])", line)):
            value = json.loads(m.group(2))
            if m.group(1) == "ENTRYPOINT":
                current.update(entrypoint=value, cmd=[])  # a new ENTRYPOINT resets CMD
            else:
                current["cmd"] = value
    return stages


def as_list(value) -> list[str] | None:
    if value is None:
        return None
    return [compose_value(v) for v in (value.split() if isinstance(value, str) else value)]


def build_targets(services) -> dict[str, str]:
    """image name -> Dockerfile target, from the services that build each image."""
    return {
        compose_value(svc["image"]): svc["build"]["target"]
        for svc in services.values()
        if isinstance(svc.get("build"), dict) and "target" in svc["build"] and "image" in svc
    }


def compose_argv(service, stages, targets: dict[str, str]) -> list[str]:
    """What the container runs: compose's entrypoint/command over the image's (Docker rules).

    A service that only names an image built by another service runs that image's target.
    """
    build = service.get("build") or {}
    target = build.get("target") or targets.get(compose_value(service.get("image", "")), "")
    image = stages.get(target, {"entrypoint": [], "cmd": []})
    entrypoint, command = as_list(service.get("entrypoint")), as_list(service.get("command"))
    if entrypoint is not None:
        return entrypoint + (command or [])
    return image["entrypoint"] + (command if command is not None else image["cmd"])


def compose_ports(service) -> set[int]:
    ports = set()
    for item in (service.get("ports") or []) + (service.get("expose") or []):
        target = item.get("target") if isinstance(item, dict) else str(item).split(":")[-1]
        ports.add(int(str(compose_value(target)).split("/")[0]))
    return ports


def split_image(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return repo, tag or "latest"


def test_compose_and_manifests_agree(rendered):
    compose_file = Path(os.environ.get("FEDERIMED_TEST_COMPOSE_FILE", ROOT / "compose.yaml"))
    assert compose_file.is_file(), (
        f"{compose_file} is missing: the manifests are checked against it (services superlink, "
        "serverapp, supernode-hospital-K, clientapp-hospital-K)"
    )
    services = yaml.safe_load(compose_file.read_text())["services"]
    stages = dockerfile_stages(ROOT / "docker" / "Dockerfile")
    docs = rendered["example-three-hospitals"]["docs"]
    hospitals = hospital_namespaces(docs)
    compose_hospitals = sorted(
        s.removeprefix("supernode-") for s in services if s.startswith("supernode-")
    )
    assert compose_hospitals == hospitals, (compose_hospitals, hospitals)

    pairs = [("superlink", "superlink", "consortium"), ("serverapp", "serverapp", "consortium")]
    for h in hospitals:
        pairs += [(f"supernode-{h}", "supernode", h), (f"clientapp-{h}", "clientapp", h)]
    problems = []
    for service_name, r, ns in pairs:
        assert service_name in services, f"compose.yaml has no service {service_name}"
        service = services[service_name]
        doc = find(docs, "Deployment", r, ns)
        (c,) = pod_spec(doc)["containers"]
        where = f"compose {service_name} vs k8s {ns}/{r}"

        compose_repo, compose_tag = split_image(compose_value(service.get("image", "")))
        k8s_repo, k8s_tag = split_image(c["image"])
        if compose_repo != k8s_repo:
            problems.append(f"{where}: image {compose_repo} != {k8s_repo}")
        if compose_tag != k8s_tag:
            problems.append(
                f"{where}: image tag {compose_tag!r} (compose default) != "
                f"{k8s_tag!r} (k8s pins the release; :latest is not allowed there)"
            )

        argv = compose_argv(service, stages, build_targets(services))
        k8s_argv = c["command"] + c["args"]
        if argv != k8s_argv:
            problems.append(f"{where}: runs {argv} != {k8s_argv}")

        k8s_env, c_env = env_of(doc, docs), compose_env(service)
        k8s_names = {k for k in k8s_env if k.startswith("FEDERIMED_")}
        compose_names = {k for k in c_env if k.startswith("FEDERIMED_")}
        if k8s_names != compose_names:
            problems.append(
                f"{where}: settings only in k8s {sorted(k8s_names - compose_names)},"
                f" only in compose {sorted(compose_names - k8s_names)}"
            )
        for key in k8s_names & compose_names:
            if key in SAME_VALUE and normalize(key, k8s_env[key]) != c_env[key]:
                problems.append(f"{where}: {key}={k8s_env[key]!r} vs {c_env[key]!r}")
            if key in SAME_PORT and (
                k8s_env[key].rsplit(":", 1)[1] != c_env[key].rsplit(":", 1)[1]
            ):
                problems.append(f"{where}: {key} port {k8s_env[key]!r} vs {c_env[key]!r}")
        for key, value in HARDENED_ENV.items():
            if key in c_env and c_env[key] != value:
                problems.append(f"{where}: {key}={c_env[key]!r}")
        ports = compose_ports(service)
        if r == "superlink" and ports and 8000 not in ports:
            problems.append(f"{where}: compose publishes {ports}, not 8000")
        if r == "supernode" and ports and ports != {9094}:
            problems.append(f"{where}: compose exposes {ports}, not 9094")
    assert not problems, "compose.yaml and k8s/ disagree:\n" + "\n".join(problems)
