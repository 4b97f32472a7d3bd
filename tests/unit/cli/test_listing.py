"""`kubectl runs list` and `owners` records, from sample API objects (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.cli import listing, views
from shared.cli.deployments import service_rows
from shared.cli.owners import admission_default, owners_record

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ts(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def run(name: str, owner: str, gpus: int, *, ns: str = "research", **status: Any) -> Any:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "creationTimestamp": ts(NOW - timedelta(hours=gpus)),
        },
        "spec": {"owner": owner, "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus}},
        "status": status,
    }


def lease(name: str, run_name: str, node: str, gpus: int = 8, closed: bool = False) -> Any:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "rq.davidlangworthy.io/run": run_name,
                "rq.davidlangworthy.io/namespace": "research",
            },
        },
        "spec": {
            "runRef": {"name": run_name, "namespace": "research"},
            "slice": {"nodes": [node], "gpus": gpus, "role": "Active"},
            "compPath": ["GROUP[0]", "RANK[0]"],
            "interval": {"start": ts(NOW - timedelta(hours=1))},
        },
        "status": {"closed": closed},
    }


NODE = {
    "metadata": {
        "name": "gpu-a-01",
        "labels": {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"},
    }
}
RUNNING = run(
    "big",
    "org:ai:rai:sys",
    64,
    phase="Running",
    width={"allocated": 48, "desired": 64},
    funding={"ownedGPUs": 40, "borrowedGPUs": 8},
)
RESERVED = run(
    "wait",
    "lab:vision",
    32,
    phase="Reserved",
    pendingReservation="wait-r1",
    conditions=[{"type": "Scheduled", "status": "False", "reason": "InsufficientCapacity"}],
)
PENDING = run("new", "org:ml", 8)
RESERVATION = {
    "metadata": {"name": "wait-r1", "namespace": "research"},
    "spec": {"runRef": {"name": "wait"}, "earliestStart": ts(NOW + timedelta(hours=3))},
}


def rows() -> list[dict[str, Any]]:
    leases = [
        lease("big-g0-r0", "big", "gpu-a-01"),
        lease("big-old", "big", "gpu-b-09", closed=True),
    ]
    return listing.list_rows([RUNNING, RESERVED, PENDING], [RESERVATION], leases, [NODE], NOW)


def test_rows_have_width_eta_reason_funding_and_domains() -> None:
    by = {r["name"]: r for r in rows()}
    assert listing.width_cell(by["big"]["width"]) == "48/64"
    assert listing.width_cell(by["new"]["width"]) == "0/8"  # no status yet: the request
    assert by["wait"]["reason"] == "InsufficientCapacity"
    assert (by["wait"]["eta"], by["wait"]["reservation"]) == ("in 3h", "research/wait-r1")
    assert by["big"]["eta"] is None and by["new"]["phase"] == "Pending"
    assert listing.funding_cell(by["big"]["funding"]) == "40 owned, 8 borrowed"
    assert listing.funding_cell(by["new"]["funding"]) == "-"
    assert by["big"]["domains"] == ["us-west/gpu-a/nv-a"]  # the closed lease's node is not shown
    assert by["big"]["age"] == "2d16h"


def test_cancel_summary_counts_open_leases() -> None:
    leases = [
        lease("big-g0-r0", "big", "gpu-a-01"),
        lease("big-g0-r1", "big", "gpu-a-02", gpus=4),
        lease("big-old", "big", "gpu-b-09", closed=True),
        lease("other", "wait", "gpu-a-03"),
    ]
    assert listing.cancel_summary(RUNNING, leases) == {
        "run": "research/big",
        "phase": "Running",
        "openLeases": 2,
        "gpus": 12,
    }


def test_filters_and_sorts() -> None:
    all_rows = rows()
    assert [r["name"] for r in all_rows if listing.matches(r, "org:ai:*", None)] == ["big"]
    # a path prefix alone relates nobody (SPEC §2: the family is the tree of Budgets)
    assert [r["name"] for r in all_rows if listing.matches(r, "org:ai", None)] == []
    assert [r["name"] for r in all_rows if listing.matches(r, "lab:*", None)] == ["wait"]
    assert [r["name"] for r in all_rows if listing.matches(r, None, ["pending", "Running"])] == [
        "big",
        "new",
    ]
    assert [r["name"] for r in listing.sort_rows(all_rows, "name")] == ["big", "new", "wait"]
    assert [r["name"] for r in listing.sort_rows(all_rows, "eta")] == ["wait", "big", "new"]
    assert [r["name"] for r in listing.sort_rows(all_rows, "age")] == ["big", "wait", "new"]
    assert [r["name"] for r in listing.sort_rows(all_rows, "gpus")] == ["big", "wait", "new"]
    with pytest.raises(views.ViewError, match="--sort"):
        listing.sort_rows(all_rows, "size")


def deployment(*, args: list[str] | None = None, env: list[dict[str, str]] | None = None) -> Any:
    container: dict[str, Any] = {"name": "admission", "command": ["jobtree-admission"]}
    if args is not None:
        container["args"] = args
    if env is not None:
        container["env"] = env
    return {
        "metadata": {"name": "jobtree-admission", "namespace": "jobtree-system"},
        "spec": {"template": {"spec": {"containers": [container]}}},
    }


def test_the_admission_default_comes_from_its_flag_or_env() -> None:
    assert admission_default(deployment(args=["--default-owner-globs", "org:*"])) == "org:*"
    assert admission_default(deployment(args=["--default-owner-globs=lab:*"])) == "lab:*"
    env = [{"name": "JOBTREE_DEFAULT_OWNER_GLOBS", "value": "org:ai:*"}]
    assert admission_default(deployment(env=env)) == "org:ai:*"
    assert admission_default(deployment()) == ""  # closed: no default owners
    other = {"spec": {"template": {"spec": {"containers": [{"command": ["nginx"]}]}}}}
    assert admission_default(other) is None


def test_owners_record_says_where_the_globs_come_from() -> None:
    budgets = [{"spec": {"owner": o}} for o in ("org:ai:rai:sys", "lab:vision", "ext:lab")]
    annotated = {
        "metadata": {"annotations": {"rq.davidlangworthy.io/owners": "org:ai:*, lab:vision"}}
    }
    record = owners_record("research", annotated, [], budgets)
    assert record["globs"] == ["org:ai:*", "lab:vision"]
    assert record["source"] == "annotation rq.davidlangworthy.io/owners on namespace research"
    assert record["budgetOwners"] == ["lab:vision", "org:ai:rai:sys"]
    assert record["otherBudgetOwners"] == ["ext:lab"]
    empty = {"metadata": {"annotations": {"rq.davidlangworthy.io/owners": ""}}}
    assert owners_record("x", empty, [], budgets)["budgetOwners"] == []  # authorises nobody
    configured = owners_record(
        "x", {"metadata": {}}, [deployment(args=["--default-owner-globs=ext:*"])], None
    )
    assert configured["globs"] == ["ext:*"]
    assert "jobtree-system/jobtree-admission" in configured["source"]
    assert "budgetOwners" not in configured  # Budgets not readable: not guessed
    unknown = owners_record("x", None, [], None)
    assert unknown["globs"] == [] and "not visible" in unknown["source"]  # closed default


def test_service_rows_find_split_and_combined_deployments() -> None:
    combined = {
        "metadata": {
            "name": "jobtree-controller-manager",
            "namespace": "jobtree-system",
            "labels": {"app.kubernetes.io/version": "1.2.3"},
        },
        "spec": {
            "replicas": 2,
            "template": {
                "spec": {
                    "containers": [
                        {"name": "binder", "image": "img:1", "command": ["jobtree-binder"]},
                        {"name": "admission", "image": "img:1", "command": ["jobtree-admission"]},
                        {"name": "sidecar", "image": "envoy", "command": ["envoy"]},
                    ]
                }
            },
        },
        "status": {"readyReplicas": 1},
    }
    split = {
        "metadata": {"name": "packer", "namespace": "jt"},
        "spec": {"template": {"spec": {"containers": [{"name": "p", "args": ["packer"]}]}}},
    }
    rows = service_rows([combined, split])
    assert [(r["service"], r["deployment"], r["ready"]) for r in rows] == [
        ("admission", "jobtree-system/jobtree-controller-manager", "1/2"),
        ("packer", "jt/packer", "0/1"),
        ("binder", "jobtree-system/jobtree-controller-manager", "1/2"),
    ]
    assert rows[0]["version"] == "1.2.3" and rows[0]["image"] == "img:1"
