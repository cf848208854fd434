"""cluster/: every Ray cluster config validates against the autoscaler's own schema, every Kubernetes manifest
has the structure its kind needs, and no file carries a credential.

Files are globbed, so a new config or manifest is covered without touching this test; a YAML file that is
neither a Ray cluster config nor a Kubernetes manifest fails.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    for i, d in enumerate(docs):
        assert isinstance(d, dict), f"{path}: document {i} is a {type(d).__name__}, not a mapping"
    return docs


def _is_ray_config(doc: dict) -> bool:
    return "provider" in doc and "available_node_types" in doc


def _is_manifest(doc: dict) -> bool:
    return "apiVersion" in doc and "kind" in doc


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


RAY_CONFIGS = [p for p in YAMLS if all(_is_ray_config(d) for d in _docs(p))]
MANIFESTS = [p for p in YAMLS if all(_is_manifest(d) for d in _docs(p))]


def test_every_yaml_is_a_ray_config_or_a_manifest():
    assert {_rel(p) for p in RAY_CONFIGS} >= {"cluster/aws.yaml", "cluster/gcp.yaml"}
    assert {_rel(p) for p in MANIFESTS} >= {"cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
                                            "cluster/mlflow/mlflow.yaml"}
    unknown = [_rel(p) for p in YAMLS if p not in RAY_CONFIGS and p not in MANIFESTS]
    assert not unknown, f"neither a Ray cluster config (provider + available_node_types) nor a manifest: {unknown}"


# ----------------------------------------------------------------------------------------------
# Ray cluster launcher configs


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=_rel)
def test_ray_cluster_config_validates_against_autoscaler_schema(path, ray_schema):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _docs(path)
    jsonschema.validate(config, ray_schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it, defaults merged


def test_schema_check_catches_a_misspelled_key(ray_schema):
    import jsonschema

    (config,) = _docs(CLUSTER / "aws.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(bad, ray_schema)


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=_rel)
def test_ray_cluster_config_has_autoscaling_gpu_workers_and_installs_ulsweep(path):
    (config,) = _docs(path)
    head = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head}
    gpu = {k: v for k, v in workers.items() if v.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu, f"{_rel(path)}: no worker node type declares GPU resources"
    for name, t in gpu.items():
        assert t.get("min_workers", 0) < t["max_workers"], f"{_rel(path)}: {name} cannot scale"
    commands = "\n".join(config.get("setup_commands", []) + config.get("worker_setup_commands", []))
    torch_pin = re.search(r"torch==(\d+)\.(\d+)", commands)
    assert torch_pin and (int(torch_pin[1]), int(torch_pin[2])) >= (2, 11), f"{_rel(path)}: torch not pinned >= 2.11"
    assert commands.index("torch==") < commands.index("ulsweep"), "torch must be installed before ulsweep"
    assert re.search(r"pip install .*ulsweep\[", commands), f"{_rel(path)}: ulsweep is not installed on the nodes"
    mounted = {os.path.normpath(v) for v in config.get("file_mounts", {}).values()}
    assert "." in mounted, f"{_rel(path)}: the repository is not mounted on the nodes"


# ----------------------------------------------------------------------------------------------
# Kubernetes manifests

KNOWN_KINDS = {  # (apiVersion, kind) that cluster/ may use
    ("v1", "Namespace"), ("v1", "Service"), ("v1", "ConfigMap"), ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"), ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"),
}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # RFC 1123 subdomain


def _all_docs() -> list[tuple[str, dict]]:
    return [(f"{_rel(p)}[{i}]", d) for p in MANIFESTS for i, d in enumerate(_docs(p))]


def _pod_spec_problems(where: str, pod: dict) -> list[str]:
    out = []
    containers = (pod or {}).get("containers") or []
    if not containers:
        return [f"{where}: no containers"]
    for c in containers:
        for key in ("name", "image"):
            if not c.get(key):
                out.append(f"{where}: a container has no {key}")
        for e in c.get("env", []):
            if "name" not in e or ("value" in e) == ("valueFrom" in e):
                out.append(f"{where}: env entry {e} needs a name and exactly one of value / valueFrom")
    return out


def _ray_cluster_spec_problems(where: str, spec: dict) -> list[str]:
    out = []
    head = (spec or {}).get("headGroupSpec") or {}
    if "template" not in head:
        out.append(f"{where}: spec.headGroupSpec.template missing")
    out += _pod_spec_problems(f"{where} head", head.get("template", {}).get("spec"))
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        out.append(f"{where}: spec.workerGroupSpecs missing or empty")
    for g in groups:
        name = g.get("groupName")
        if not name:
            out.append(f"{where}: a worker group has no groupName")
        if not g.get("minReplicas", 0) <= g.get("maxReplicas", -1):
            out.append(f"{where}: worker group {name}: minReplicas > maxReplicas (or maxReplicas missing)")
        out += _pod_spec_problems(f"{where} group {name}", g.get("template", {}).get("spec"))
    gpus = [c for g in groups for c in g.get("template", {}).get("spec", {}).get("containers", [])
            if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1]
    if not gpus:
        out.append(f"{where}: no worker group has an nvidia.com/gpu limit")
    return out


def _manifest_problems(where: str, doc: dict) -> list[str]:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if (api, kind) not in KNOWN_KINDS:
        return [f"{where}: unknown apiVersion/kind {api}/{kind}"]
    name = (doc.get("metadata") or {}).get("name")
    if not name or not _NAME.match(name):
        return [f"{where}: metadata.name {name!r} is missing or not a valid Kubernetes name"]
    spec = doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet"):
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        selector = spec.get("selector", {}).get("matchLabels", {})
        out = _pod_spec_problems(where, spec.get("template", {}).get("spec"))
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            out.append(f"{where}: spec.selector.matchLabels {selector} does not select the pod labels {labels}")
        if kind == "StatefulSet" and not spec.get("serviceName"):
            out.append(f"{where}: StatefulSet needs spec.serviceName")
        return out
    if kind == "Service":
        ports = spec.get("ports") or []
        return [] if ports and all("port" in p for p in ports) else [f"{where}: spec.ports missing or without port"]
    if kind == "RayCluster":
        return _ray_cluster_spec_problems(where, spec)
    if kind == "RayJob":
        out = [] if spec.get("entrypoint") else [f"{where}: spec.entrypoint missing"]
        if "rayClusterSpec" in spec:
            out += _ray_cluster_spec_problems(where, spec["rayClusterSpec"])
        elif not spec.get("clusterSelector"):
            out.append(f"{where}: neither spec.rayClusterSpec nor spec.clusterSelector")
        return out
    return []


def test_every_manifest_has_the_fields_its_kind_needs():
    docs = _all_docs()
    assert len(docs) >= 7
    problems = [p for where, d in docs for p in _manifest_problems(where, d)]
    assert not problems, "\n".join(problems)


def test_manifest_checks_catch_broken_documents():
    (rc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    no_gpu = copy.deepcopy(rc)
    for g in no_gpu["spec"]["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            c["resources"]["limits"].pop("nvidia.com/gpu")
    assert any("nvidia.com/gpu" in p for p in _manifest_problems("x", no_gpu))
    no_head = copy.deepcopy(rc)
    del no_head["spec"]["headGroupSpec"]
    assert any("headGroupSpec" in p for p in _manifest_problems("x", no_head))
    assert _manifest_problems("x", {"apiVersion": "ray.io/v1alpha9", "kind": "RayCluster"})
    assert _manifest_problems("x", {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j"},
                                    "spec": {"clusterSelector": {"ray.io/cluster": "c"}}})  # no entrypoint
    bad_selector = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                    "spec": {"selector": {"matchLabels": {"app": "a"}},
                             "template": {"metadata": {"labels": {"app": "b"}},
                                          "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    assert any("matchLabels" in p for p in _manifest_problems("x", bad_selector))


def test_services_select_a_workload_in_their_namespace():
    docs = [d for _, d in _all_docs()]
    workloads = [(d["metadata"].get("namespace"), d["spec"]["template"]["metadata"]["labels"]) for d in docs
                 if d["kind"] in ("Deployment", "StatefulSet")]
    for d in docs:
        if d["kind"] == "Service":
            ns, sel = d["metadata"].get("namespace"), d["spec"]["selector"]
            assert any(wns == ns and all(lab.get(k) == v for k, v in sel.items()) for wns, lab in workloads), \
                f"Service {d['metadata']['name']} selects no Deployment/StatefulSet"


def test_raycluster_derives_a_valid_autoscaling_config_with_gpu_workers():
    """Ray's own KubeRay translation (what the in-tree autoscaler runs) accepts the RayCluster."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    (rc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    rc = {**rc, "metadata": {**rc["metadata"], "namespace": "default"}}
    cfg = _derive_autoscaling_config_from_ray_cr(rc)
    validate_config(cfg)
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] < t["max_workers"] for t in gpu)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs the driver only


def test_rayjob_runs_the_sweep_on_the_raycluster_spec():
    (rc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    (job,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == rc["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    entry = " ".join(job["spec"]["entrypoint"].split())
    assert "ulsweep run experiments/lf_sweep.yaml" in entry
    assert re.search(r"--storage s3://\S+", entry) and re.search(r"--tracking-uri http://\S+:5000", entry)
    assert (REPO / "experiments" / "lf_sweep.yaml").is_file()


# ----------------------------------------------------------------------------------------------
# credentials


def _credential_envs(doc) -> list[dict]:
    """Every env entry (any depth) whose name looks like a credential."""
    from ulsweep.tracking.redact import is_credential_name

    found = []
    if isinstance(doc, dict):
        if isinstance(doc.get("name"), str) and ("value" in doc or "valueFrom" in doc) \
                and is_credential_name(doc["name"]):
            found.append(doc)
        for v in doc.values():
            found += _credential_envs(v)
    elif isinstance(doc, list):
        for v in doc:
            found += _credential_envs(v)
    return found


def test_manifests_take_credentials_from_secrets_only():
    envs = [e for _, d in _all_docs() for e in _credential_envs(d)]
    assert {e["name"] for e in envs} >= {"AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "POSTGRES_PASSWORD"}
    inline = [e["name"] for e in envs if "value" in e or "secretKeyRef" not in e.get("valueFrom", {})]
    assert not inline, f"credentials set inline instead of from a Secret: {inline}"
    assert not [d for _, d in _all_docs() if d["kind"] == "Secret"], "Secrets are created by kubectl, not stored"


_LEAKS = [
    (re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
    # user:password@ in a URI; <placeholders>, *** and $VARIABLES are not passwords
    (re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s@:'\"]+:(?![<*$])[^/\s@'\"]+@"), "user:password@ in a URI"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)(secret|password|token)[a-z_]*\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}"), "a literal secret"),
]


def test_no_file_in_cluster_carries_a_credential():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 8 and CLUSTER / "README.md" in files
    hits = [f"{_rel(p)}: {what}" for p in files for rx, what in _LEAKS if rx.search(p.read_text())]
    assert not hits, hits
    assert _LEAKS[1][0].search("postgresql://mlflow:hunter2hunter2@db/mlflow")  # the patterns do match leaks
    assert not _LEAKS[1][0].search("http://<user>:<password>@host")
    assert _LEAKS[3][0].search("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMIK7MDENGbPxRfiCY")
