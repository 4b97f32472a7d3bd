"""Roles for people, on the real API server with RBAC: a researcher bound with a RoleBinding of
``jobtree-researcher`` (and the cluster-wide ``jobtree-ledger-reader``) may manage Runs in their
namespace only and read the ledger, never Budgets or Reservations; ``jobtree-admin`` may manage
Budgets, administrator Reservations and the owners annotation; no person's role writes Leases or
Pods. ``kubectl runs plan`` works with the researcher's own token.

The aggregation into ``view``/``edit``/``admin`` needs kube-controller-manager, which the test
control plane does not run, so it is checked on the rendered labels only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.localenv.controlplane import ControlPlane, kubeconfig_text
from tests.conftest import ensure_namespace
from tests.deploy.conftest import CHART, documents, find, run

pytestmark = pytest.mark.kube

TEAM = "rbac-team"
OTHER = "rbac-other"
PEOPLE = "rbac-people"
RESEARCHER = f"system:serviceaccount:{PEOPLE}:alice"
ADMIN = "bob"
RQ = "rq.davidlangworthy.io"
RUN = f"""apiVersion: {RQ}/v1
kind: Run
metadata: {{name: rbac-probe, namespace: {TEAM}}}
spec:
  owner: org:rbac:team
  resources: {{gpuType: H100-80GB, totalGPUs: 8}}
"""


def rendered(deploy_bin: Path, *flags: str) -> list[dict[str, Any]]:
    out = run(
        [
            deploy_bin / "helm",
            "template",
            "jobtree",
            CHART,
            "--show-only",
            "templates/user-roles.yaml",
            *flags,
        ]
    ).stdout
    return documents(out)


def can(kube: ControlPlane, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    where = ["-n", namespace] if namespace else []
    resource, _, sub = resource.partition("/")
    if sub:
        where.append(f"--subresource={sub}")
    done = kube.kubectl("auth", "can-i", verb, resource, *where, "--as", who, check=False)
    return done.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def roles(crds: ControlPlane, deploy_bin: Path) -> ControlPlane:
    kube = crds
    for ns in (TEAM, OTHER, PEOPLE):
        ensure_namespace(kube, ns)
    docs = rendered(deploy_bin, "--set", "rbac.ledgerReaders={jobtree-test-researchers}")
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    kube.kubectl("create", "serviceaccount", "alice", "-n", PEOPLE, check=False)
    kube.kubectl(
        "create",
        "rolebinding",
        "alice-runs",
        "-n",
        TEAM,
        "--clusterrole=jobtree-researcher",
        f"--serviceaccount={PEOPLE}:alice",
        check=False,
    )
    kube.kubectl(
        "create",
        "clusterrolebinding",
        "alice-ledger",
        "--clusterrole=jobtree-ledger-reader",
        f"--serviceaccount={PEOPLE}:alice",
        check=False,
    )
    kube.kubectl(
        "create",
        "clusterrolebinding",
        "bob-admin",
        "--clusterrole=jobtree-admin",
        f"--user={ADMIN}",
        check=False,
    )
    return kube


def test_researcher_manages_runs_in_their_namespace_only(roles: ControlPlane) -> None:
    kube = roles
    for verb in ("create", "get", "list", "watch", "delete", "patch"):
        assert can(kube, RESEARCHER, verb, f"runs.{RQ}", TEAM), verb
    assert not can(kube, RESEARCHER, "create", f"runs.{RQ}", OTHER)
    assert can(kube, RESEARCHER, "get", f"reservations.{RQ}", TEAM)
    assert not can(kube, RESEARCHER, "create", f"reservations.{RQ}", TEAM)
    assert not can(kube, RESEARCHER, "patch", f"runs.{RQ}/status", TEAM)
    assert can(kube, RESEARCHER, "get", "pods/log", TEAM)
    assert can(kube, RESEARCHER, "get", f"runs.{RQ}/status", TEAM)
    assert not can(kube, RESEARCHER, "create", "pods", TEAM)


def test_researcher_reads_the_ledger_but_writes_nothing_cluster_wide(roles: ControlPlane) -> None:
    kube = roles
    for resource in (f"budgets.{RQ}", f"leases.{RQ}", "nodes"):
        assert can(kube, RESEARCHER, "list", resource, None), resource
    for resource in (f"budgets.{RQ}", f"leases.{RQ}"):
        assert not can(kube, RESEARCHER, "create", resource, None), resource
    assert not can(kube, RESEARCHER, "patch", "namespaces", None)


def test_admin_manages_budgets_reservations_and_the_owners_annotation(roles: ControlPlane) -> None:
    kube = roles
    assert can(kube, ADMIN, "create", f"budgets.{RQ}", None)
    assert can(kube, ADMIN, "create", f"reservations.{RQ}", TEAM)
    assert can(kube, ADMIN, "patch", "namespaces", None)
    assert can(kube, ADMIN, "delete", f"runs.{RQ}", OTHER)
    for verb in ("create", "patch", "delete"):
        assert not can(kube, ADMIN, verb, f"leases.{RQ}", None), verb
        assert not can(kube, ADMIN, verb, "pods", TEAM), verb
    assert not can(kube, ADMIN, "patch", f"leases.{RQ}/status", None)


def test_plan_as_the_researcher_with_only_their_roles(roles: ControlPlane, tmp_path: Path) -> None:
    kube = roles
    token = kube.kubectl("create", "token", "alice", "-n", PEOPLE).stdout.strip()
    config = tmp_path / "alice.kubeconfig"
    config.write_text(kubeconfig_text(kube.server, token, namespace=TEAM))
    env = dict(os.environ, KUBECONFIG=str(config))
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{kube.bin_dir}{os.pathsep}{env['PATH']}"
    )

    def as_alice(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kube.bin_dir / "kubectl"), *argv],
            input=stdin,
            env=env,
            text=True,
            capture_output=True,
            timeout=60,
        )

    created = as_alice("apply", "-f", "-", stdin=RUN)
    assert created.returncode == 0, created.stderr
    listed = as_alice("get", f"budgets.{RQ}")
    assert listed.returncode == 0, listed.stderr  # the ledger reader may list Budgets
    forbidden = as_alice("create", "namespace", "alice-made-this")
    assert forbidden.returncode != 0 and "forbidden" in forbidden.stderr.lower()
    plan = as_alice("runs", "plan", "rbac-probe")
    assert plan.returncode == 0, plan.stderr
    assert "rbac-probe" in plan.stdout
    usage = as_alice("runs", "budgets", "usage")
    assert usage.returncode == 0, usage.stderr
    as_alice("delete", "run", "rbac-probe", "--wait=false")


def test_roles_aggregate_into_the_built_in_roles_and_no_person_writes_leases(
    deploy_bin: Path,
) -> None:
    docs = {d["metadata"]["name"]: d for d in find(rendered(deploy_bin), "ClusterRole")}
    assert set(docs) == {
        "jobtree-researcher",
        "jobtree-viewer",
        "jobtree-ledger-reader",
        "jobtree-admin",
    }
    labels = {name: d["metadata"]["labels"] for name, d in docs.items()}
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k in labels["jobtree-researcher"] if k.startswith(aggregate)} == {
        f"{aggregate}edit",
        f"{aggregate}admin",
    }
    assert {k for k in labels["jobtree-viewer"] if k.startswith(aggregate)} == {f"{aggregate}view"}
    for name in ("jobtree-ledger-reader", "jobtree-admin"):
        assert not [k for k in labels[name] if k.startswith(aggregate)], name
    for name, doc in docs.items():
        for rule in doc["rules"]:
            writes = set(rule["verbs"]) - {"get", "list", "watch"}
            touched = set(rule["resources"])
            assert not (writes and touched & {"leases", "leases/status", "pods"}), name
    assert not find(
        rendered(deploy_bin), "ClusterRoleBinding"
    )  # nobody reads the ledger by default
    off = run([deploy_bin / "helm", "template", "jobtree", CHART, "--set", "rbac.userRoles=false"])
    assert "jobtree-researcher" not in off.stdout
