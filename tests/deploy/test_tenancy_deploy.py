"""Tenancy and pod policy in the packagings: the Helm chart and the Kustomize overlays rendered with
the real helm / kubectl kustomize, and the namespace-owners ValidatingAdmissionPolicy and the
Reservation role enforced by the real kube-apiserver."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace
from tests.deploy.conftest import KUSTOMIZE, documents, find, one, run
from tests.deploy.test_helm import containers, env_of, template

pytestmark = pytest.mark.kube

OWNERS = "rq.davidlangworthy.io/owners"
POLICY = "jobtree-namespace-owners"
PROD_GROUPS = ["system:masters", "jobtree-tenancy-admins"]
DEFAULT_POLICY_ENV = {
    "JOBTREE_POD_POLICY_ALLOW": "",
    "JOBTREE_POD_POLICY_CAPABILITIES": "",
    "JOBTREE_POD_POLICY_SERVICE_ACCOUNTS": "default",
    "JOBTREE_MAX_TEMPLATE_BYTES": "65536",
}


def service_env(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    (container,) = containers(one(docs, "Deployment", f"jobtree-{service}"))
    return env_of(container)


def kustomize(kube: ControlPlane, overlay: str) -> list[dict[str, Any]]:
    return documents(kube.kubectl("kustomize", str(KUSTOMIZE / overlay)).stdout)


def test_chart_defaults_are_closed(deploy_bin: Path) -> None:
    docs = template(deploy_bin, "--set", "mode=split")
    for service in ("admission", "binder"):
        env = service_env(docs, service)
        assert {k: env[k] for k in DEFAULT_POLICY_ENV} == DEFAULT_POLICY_ENV, service
    for service in ("packer", "forecast", "resolver"):
        assert "JOBTREE_POD_POLICY_ALLOW" not in service_env(docs, service)
    assert "JOBTREE_DEFAULT_OWNER_GLOBS" not in service_env(docs, "admission")  # nobody
    assert not find(docs, "ValidatingAdmissionPolicy")
    role = one(docs, "ClusterRole", "jobtree-reservation-admin")
    assert role["rules"] == [
        {
            "apiGroups": ["rq.davidlangworthy.io"],
            "resources": ["reservations"],
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
        }
    ]
    assert not find(docs, "ClusterRoleBinding", "jobtree-reservation-admin")
    # jobtree-admin is the platform team's role: administrator Reservations are part of it
    admins = {role["metadata"]["name"], "jobtree-admin"}
    others = [r for r in find(docs, "ClusterRole") if r["metadata"]["name"] not in admins]
    for (
        other
    ) in others:  # no tenant-facing role and no service can write Reservations except forecast
        for rule in other["rules"]:
            if (
                "reservations" in rule["resources"]
                and other["metadata"]["name"] != "jobtree-forecast"
            ):
                assert set(rule["verbs"]) <= {"get", "list", "watch"}, other["metadata"]["name"]


def test_chart_pod_policy_values_reach_admission_and_binder(deploy_bin: Path) -> None:
    docs = template(
        deploy_bin,
        "--set", "podPolicy.allow={hostPath,nodeName}",
        "--set", "podPolicy.capabilities={SYS_PTRACE}",
        "--set", "podPolicy.serviceAccounts={default,train-*}",
        "--set", "podPolicy.maxTemplateBytes=131072",
        "--set", "services.admission.defaultOwnerGlobs=org:ai:*",
    )  # fmt: skip
    (manager,) = find(docs, "Deployment")
    envs = {c["name"]: env_of(c) for c in containers(manager)}
    for service in ("admission", "binder"):
        env = envs[service]
        assert env["JOBTREE_POD_POLICY_ALLOW"] == "hostPath,nodeName"
        assert env["JOBTREE_POD_POLICY_CAPABILITIES"] == "SYS_PTRACE"
        assert env["JOBTREE_POD_POLICY_SERVICE_ACCOUNTS"] == "default,train-*"
        assert env["JOBTREE_MAX_TEMPLATE_BYTES"] == "131072"
    assert envs["admission"]["JOBTREE_DEFAULT_OWNER_GLOBS"] == "org:ai:*"
    bad = run(
        [deploy_bin / "helm", "template", "jobtree", str(KUSTOMIZE.parents[0] / "helm/gpu-fleet"),
         "--set", "podPolicy.allow={hostpath}"],
        check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "/podPolicy/allow/0" in bad.stderr, bad.stderr


def test_chart_owners_policy_is_opt_in_and_the_prod_policy(
    deploy_bin: Path, kube: ControlPlane
) -> None:
    chart = str(KUSTOMIZE.parents[0] / "helm/gpu-fleet")
    missing = run(
        [
            deploy_bin / "helm",
            "template",
            "jobtree",
            chart,
            "--set",
            "tenancy.ownersPolicy.enabled=true",
        ],
        check=False,
    )
    assert missing.returncode != 0 and "tenancy.ownersPolicy.groups" in missing.stderr
    docs = template(
        deploy_bin,
        "--set", "tenancy.ownersPolicy.enabled=true",
        "--set", "tenancy.ownersPolicy.groups={" + ",".join(PROD_GROUPS) + "}",
        "--set", "tenancy.reservationAdmins.groups={platform-admins}",
    )  # fmt: skip
    helm_policy = one(docs, "ValidatingAdmissionPolicy", POLICY)
    helm_binding = one(docs, "ValidatingAdmissionPolicyBinding", POLICY)
    prod = kustomize(kube, "prod")
    ours = one(prod, "ValidatingAdmissionPolicy", POLICY)
    # one rule, two packagings: the same CEL (the group list is a JSON list in the chart)
    for doc in (helm_policy, ours):
        allowed = next(v for v in doc["spec"]["variables"] if v["name"] == "allowed")
        assert json.loads(allowed["expression"].replace("'", '"')) == PROD_GROUPS
        allowed["expression"] = "<groups>"
    assert helm_policy["spec"] == ours["spec"]
    assert helm_binding["spec"] == one(prod, "ValidatingAdmissionPolicyBinding", POLICY)["spec"]
    binding = one(docs, "ClusterRoleBinding", "jobtree-reservation-admin")
    assert binding["roleRef"]["name"] == "jobtree-reservation-admin"
    assert binding["subjects"] == [
        {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "platform-admins"}
    ]


def test_kustomize_base_names_the_closed_defaults(kube: ControlPlane) -> None:
    docs = kustomize(kube, "base")
    for service in ("admission", "binder"):
        env = service_env(docs, service)
        assert {k: env[k] for k in DEFAULT_POLICY_ENV} == DEFAULT_POLICY_ENV, service
    assert service_env(docs, "admission")["JOBTREE_DEFAULT_OWNER_GLOBS"] == ""
    one(docs, "ClusterRole", "jobtree-reservation-admin")


def _as(kube: ControlPlane, user: str, group: str, *args: str) -> Any:
    return kube.kubectl(*args, f"--as={user}", f"--as-group={group}", check=False)


def test_prod_owners_policy_is_enforced(crds: ControlPlane) -> None:
    """Applied for real: a namespace editor outside the named groups cannot set, change or
    remove the owners annotation; other edits, and the tenancy administrators, go through."""
    kube = crds
    policy = [d for d in kustomize(kube, "prod") if d["metadata"]["name"] == POLICY]
    assert [d["kind"] for d in policy] == [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    editors = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "t-namespace-editor"},
        "rules": [
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "patch", "update"]}
        ],
    }
    bind = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "t-namespace-editor"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "t-namespace-editor",
        },
        "subjects": [
            {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": g}
            for g in ("team-leads", "jobtree-tenancy-admins")
        ],
    }
    objects = json.dumps({"apiVersion": "v1", "kind": "List", "items": [*policy, editors, bind]})
    ns = "t-owners-guarded"
    ensure_namespace(kube, ns)
    kube.kubectl("annotate", "--overwrite", "namespace", ns, f"{OWNERS}=org:ai:*")
    kube.kubectl("apply", "-f", "-", input=objects)
    try:
        deadline = time.monotonic() + 30
        attempt = 0
        while True:  # the API server picks new policies up asynchronously
            attempt += 1  # a new value each time: re-writing the same value changes nothing
            change = f"{OWNERS}=org:try{attempt}:*"
            denied = _as(
                kube, "mallory", "team-leads", "annotate", "--overwrite", "namespace", ns, change
            )
            if denied.returncode != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        kube.kubectl("annotate", "--overwrite", "namespace", ns, f"{OWNERS}=org:ai:*")
        assert denied.returncode != 0, "the owners policy never denied"
        assert POLICY in denied.stderr
        assert "only members of system:masters, jobtree-tenancy-admins may set" in denied.stderr
        removed = _as(kube, "mallory", "team-leads", "annotate", "namespace", ns, f"{OWNERS}-")
        assert removed.returncode != 0 and POLICY in removed.stderr
        labelled = _as(
            kube, "mallory", "team-leads", "label", "--overwrite", "namespace", ns, "team=a"
        )
        assert labelled.returncode == 0, labelled.stderr
        ns_obj = json.loads(kube.kubectl("get", "namespace", ns, "-o", "json").stdout)
        assert ns_obj["metadata"]["annotations"][OWNERS] == "org:ai:*"  # unchanged
        admin = _as(
            kube,
            "tina",
            "jobtree-tenancy-admins",
            "annotate",
            "--overwrite",
            "namespace",
            ns,
            f"{OWNERS}=org:ml:*",
        )
        assert admin.returncode == 0, admin.stderr
        kube.kubectl(
            "annotate", "--overwrite", "namespace", ns, f"{OWNERS}=org:ai:*"
        )  # system:masters
    finally:
        kube.kubectl("delete", "--ignore-not-found", "-f", "-", input=objects)


def test_only_the_reservation_role_creates_reservations(crds: ControlPlane) -> None:
    kube = crds
    role = one(kustomize(kube, "base"), "ClusterRole", "jobtree-reservation-admin")
    bind = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "t-reservation-admin"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        },
        "subjects": [
            {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "platform-admins"}
        ],
    }
    objects = json.dumps({"apiVersion": "v1", "kind": "List", "items": [role, bind]})
    kube.kubectl("apply", "-f", "-", input=objects)
    try:

        def can(group: str, verb: str) -> str:
            done = _as(
                kube,
                "someone",
                group,
                "auth",
                "can-i",
                verb,
                "reservations.rq.davidlangworthy.io",
                "-n",
                "team-a",
            )
            return done.stdout.strip()

        assert can("platform-admins", "create") == "yes"
        assert can("platform-admins", "delete") == "yes"
        assert can("team-leads", "create") == "no"
        assert can("team-leads", "get") == "no"
    finally:
        kube.kubectl("delete", "--ignore-not-found", "-f", "-", input=objects)


def test_the_documented_kustomize_relaxation_reaches_both_services(
    kube: ControlPlane, tmp_path: Path
) -> None:
    """docs/security.md's overlay patch, built with the real kubectl kustomize."""
    page = (KUSTOMIZE.parents[1] / "docs" / "security.md").read_text()
    start = page.index("# overlay kustomization.yaml")
    snippet = page[start : page.index("```", start)]
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(KUSTOMIZE / "base", overlay)
    (overlay / "kustomization.yaml").write_text(f"resources: [{base}]\n" + snippet)
    docs = documents(kube.kubectl("kustomize", str(overlay)).stdout)
    for service in ("admission", "binder"):
        env = service_env(docs, service)
        assert env["JOBTREE_POD_POLICY_ALLOW"] == "hostPath", service
        assert env["JOBTREE_POD_POLICY_SERVICE_ACCOUNTS"] == "default", service
