"""The Kustomize base and overlays, built with the real `kubectl kustomize` and dry-run applied
(`--dry-run=server`) against the real kube-apiserver; the prod overlay's walltime policy is also
enforced for real."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.bus.settings import KNOBS
from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace
from tests.deploy.conftest import (
    CHART,
    KUSTOMIZE,
    REPO,
    SERVICES,
    console_scripts,
    documents,
    find,
    one,
    run,
)

pytestmark = pytest.mark.kube

PRIVATE_REGISTRY = "registry.internal.example/"
PUBLIC_REGISTRIES = re.compile(
    r"docker\.io|ghcr\.io|quay\.io|gcr\.io|registry\.k8s\.io|k8s\.gcr\.io|"
    r"mcr\.microsoft\.com|public\.ecr\.aws|nvcr\.io|registry\.gitlab\.com"
)


def build(kube: ControlPlane, overlay: str) -> str:
    return kube.kubectl("kustomize", str(KUSTOMIZE / overlay)).stdout


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in find(docs, "Deployment")}


def images(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            out.append(c["image"])
    return out


def test_base_crds_are_the_repository_crds() -> None:
    repo = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    base = {p.name: p.read_bytes() for p in sorted((KUSTOMIZE / "base" / "crds").glob("*.yaml"))}
    assert base == repo, "deploy/kustomize/base/crds/ drifted: cp crds/*.yaml into it"


def test_base_is_the_split_install(kube: ControlPlane) -> None:
    docs = documents(build(kube, "base"))
    assert set(deployments(docs)) == {f"jobtree-{s}" for s in SERVICES}
    assert {d["metadata"]["name"] for d in find(docs, "CustomResourceDefinition")} == {
        f"{p}.rq.davidlangworthy.io" for p in ("budgets", "runs", "reservations", "leases")
    }
    one(docs, "Namespace", "jobtree-system")
    one(docs, "StatefulSet", "jobtree-nats")
    scripts = console_scripts()
    (engine,) = [
        d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("jobtree-engine-")
    ]
    for name, deployment in deployments(docs).items():
        assert deployment["metadata"]["namespace"] == "jobtree-system"
        spec = deployment["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == name
        (container,) = spec["containers"]
        assert container["command"][0] in scripts
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["JOBTREE_NATS_URL"] == "tls://jobtree-nats:4222"
        assert container["envFrom"] == [{"configMapRef": {"name": engine["metadata"]["name"]}}]


def test_base_gives_every_service_the_engine_settings_of_the_code(kube: ControlPlane) -> None:
    (engine,) = [
        d for d in find(documents(build(kube, "base")), "ConfigMap")
        if d["metadata"]["name"].startswith("jobtree-engine-")
    ]  # fmt: skip
    defaults = {knob.env: knob.default() for knob in KNOBS}
    assert {k: f"{float(v):g}" for k, v in engine["data"].items()} == defaults


def test_base_rbac_matches_the_helm_chart(kube: ControlPlane, deploy_bin: Path) -> None:
    """One least-privilege design, two packagings: the ClusterRoles must not drift apart."""
    docs = documents(build(kube, "base"))
    chart = documents(
        run([deploy_bin / "helm", "template", "jobtree", CHART, "--set", "mode=split"]).stdout
    )
    for kind in ("ClusterRole", "Role"):
        ours = {r["metadata"]["name"]: r["rules"] for r in find(docs, kind)}
        helm = {r["metadata"]["name"]: r["rules"] for r in find(chart, kind)}
        assert ours == helm, kind


def test_dev_overlay(kube: ControlPlane) -> None:
    docs = documents(build(kube, "dev"))
    found = deployments(docs)
    assert set(found) == {f"jobtree-{s}" for s in SERVICES}
    for deployment in found.values():
        assert deployment["spec"]["replicas"] == 1
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["--log-level", "DEBUG", "--log-format", "text"]
        assert container["image"].endswith(":dev")


def test_prod_overlay_references_only_the_private_registry(kube: ControlPlane) -> None:
    text = build(kube, "prod")
    docs = documents(text)
    assert not PUBLIC_REGISTRIES.findall(text), sorted(set(PUBLIC_REGISTRIES.findall(text)))
    found = images(docs)
    assert len(found) == len(SERVICES) + 1  # the services and NATS
    assert all(image.startswith(PRIVATE_REGISTRY) for image in found), found
    # images the services create pods with are private too
    for deployment in find(docs, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if e["name"].endswith("_IMAGE"):
                    assert e["value"].startswith(PRIVATE_REGISTRY), e
    replicas = {n: d["spec"]["replicas"] for n, d in deployments(docs).items()}
    assert replicas["jobtree-admission"] == 3 and replicas["jobtree-binder"] == 2
    policy = one(docs, "ValidatingAdmissionPolicy", "jobtree-require-walltime")
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
    binding = one(docs, "ValidatingAdmissionPolicyBinding", "jobtree-require-walltime")
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == {
        "jobtree.io/enforce-walltime": "true"
    }


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_passes_server_side_dry_run(crds: ControlPlane, overlay: str) -> None:
    ensure_namespace(crds, "jobtree-system")
    done = crds.kubectl("apply", "--dry-run=server", "-f", "-", input=build(crds, overlay))
    assert "deployment.apps/jobtree-binder" in done.stdout
    if overlay == "prod":
        assert "validatingadmissionpolicy" in done.stdout


def _run_manifest(namespace: str, walltime: bool) -> str:
    run_obj = yaml.safe_load((REPO / "config/samples/runs/run-128-groups.yaml").read_text())
    run_obj["metadata"] = {"name": "walltime-check", "namespace": namespace}
    if not walltime:
        run_obj["spec"]["runtime"].pop("maxDuration")
    return json.dumps(run_obj)


def test_prod_walltime_policy_is_enforced(crds: ControlPlane) -> None:
    """Applied for real: in a labelled namespace a Run without maxDuration is denied."""
    docs = documents(build(crds, "prod"))
    policy = [
        d for d in docs if d["metadata"]["name"] == "jobtree-require-walltime"
    ]  # policy + binding
    assert len(policy) == 2
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": policy})
    enforced, free = "t-walltime-enforced", "t-walltime-free"
    ensure_namespace(crds, enforced)
    ensure_namespace(crds, free)
    crds.kubectl("label", "namespace", enforced, "jobtree.io/enforce-walltime=true", "--overwrite")
    crds.kubectl("apply", "-f", "-", input=manifest)
    try:
        deadline = time.monotonic() + 30
        while True:  # the API server picks new policies up asynchronously
            denied = crds.kubectl(
                "create", "--dry-run=server", "-f", "-",
                input=_run_manifest(enforced, walltime=False), check=False,
            )  # fmt: skip
            if denied.returncode != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert denied.returncode != 0, "the walltime policy never denied"
        assert "spec.runtime.maxDuration (walltime) is required" in denied.stderr
        assert "jobtree-require-walltime" in denied.stderr
        crds.kubectl("create", "--dry-run=server", "-f", "-", input=_run_manifest(enforced, True))
        crds.kubectl("create", "--dry-run=server", "-f", "-", input=_run_manifest(free, False))
    finally:
        crds.kubectl("delete", "--ignore-not-found", "-f", "-", input=manifest)
