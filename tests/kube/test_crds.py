"""The generated CRDs on a real kube-apiserver: samples apply, bad manifests are rejected with
field-path messages, and the ledger kinds stay immutable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.api import parse_object
from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "config" / "samples").rglob("*.yaml"))
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))
NS = "jobtree-api-test"
GROUP = "rq.davidlangworthy.io"
TEST_LABEL = "jobtree.test/suite=api-crds"
PLURALS = ("budgets", "runs", "reservations", "leases")


@pytest.fixture(scope="module")
def kc(crds: ControlPlane) -> Iterator[ControlPlane]:
    """CRDs installed and a namespace of our own."""
    kube = crds
    ensure_namespace(kube, NS)
    try:
        yield kube
    finally:
        kube.kubectl(
            "delete",
            "-n",
            NS,
            "-R",
            "-f",
            str(REPO / "config" / "samples"),
            "--ignore-not-found",
            "--wait=false",
            check=False,
        )
        for plural in PLURALS:
            kube.kubectl(
                "delete",
                f"{plural}.{GROUP}",
                "-A",
                "-l",
                TEST_LABEL,
                "--ignore-not-found",
                "--wait=false",
                check=False,
            )


def rejected(kube: ControlPlane, *args: str, input: str | None = None) -> str:
    """stderr of a kubectl call that must fail."""
    done = kube.kubectl(*args, input=input, check=False)
    assert done.returncode != 0, f"kubectl {' '.join(args)} was accepted:\n{done.stdout}"
    return done.stderr


def get_json(kube: ControlPlane, *args: str) -> Any:
    return json.loads(kube.kubectl("get", *args, "-o", "json").stdout)


def expectations(path: Path) -> list[str]:
    return [
        line.removeprefix("# expect: ")
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("# expect: ")
    ]


def lease(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": {"jobtree.test/suite": "api-crds"}},
        "spec": {
            "owner": "org:ai:rai:sys",
            "runRef": {"name": "run-128-groups", "namespace": NS},
            "compPath": ["SHARD[1]", "D"],
            "slice": {"nodes": ["gpu-a-01"], "gpus": 8, "role": "Active"},
            "interval": {"start": "2026-11-28T10:00:00Z"},
            "paidByEnvelope": "west-h100-nv-a",
            "paidByBudget": "west-h100",
            "paidByOwner": "org:ai:rai:sys",
            "reason": "Start",
        },
    }


def create(kube: ControlPlane, doc: dict[str, Any], *args: str) -> None:
    kube.kubectl("create", *args, "-f", "-", input=json.dumps(doc))


def patch_status(kube: ControlPlane, status: Any, *target: str, check: bool = True) -> str:
    """Merge-patch the status subresource (as a controller would); stderr on failure."""
    patch = json.dumps({"status": status})
    args = ("patch", *target, "--subresource=status", "--type=merge", "-p", patch)
    return kube.kubectl(*args, check=check).stderr


CLOSED = {"closed": True, "endTime": "2026-11-28T12:00:00Z", "closureReason": "Completed"}


def test_crds_are_served_with_names_and_category(kc: ControlPlane) -> None:
    out = kc.kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    assert "gpulease,gl" in out and "jobtree" in out
    for plural in PLURALS:
        crd = get_json(kc, "crd", f"{plural}.{GROUP}")
        assert crd["spec"]["names"]["categories"] == ["jobtree"]
        assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_every_sample_applies(kc: ControlPlane, path: Path) -> None:
    kc.kubectl("apply", "--validate=strict", "-n", NS, "-f", str(path))
    live = get_json(kc, "-n", NS, "-f", str(path))
    for item in live.get("items", [live]):
        parse_object(item)  # what the server stored, defaults included, reads back


def test_server_applies_defaults(kc: ControlPlane) -> None:
    kc.kubectl("apply", "-n", NS, "-f", str(REPO / "config/samples/runs/run-cofunded-128.yaml"))
    spec = get_json(kc, "-n", NS, "run", "run-cofunded-128")["spec"]
    assert spec["locality"]["allowCrossGroupSpread"] is True
    assert spec["runtime"]["maxRestarts"] == 0
    assert spec["sparesPerGroup"] == 0
    assert spec["opportunistic"] is False
    assert spec["funding"]["allowBorrow"] is True


def test_short_names_and_category(kc: ControlPlane) -> None:
    for resource in ("bud", f"budgets.{GROUP}", "gl", "gpulease", f"leases.{GROUP}"):
        kc.kubectl("get", resource)
    for short in ("rn", "resv"):
        kc.kubectl("get", "-n", NS, short)
    kc.kubectl("apply", "-n", NS, "-R", "-f", str(REPO / "config" / "samples"))
    listed = kc.kubectl("get", "jobtree", "-n", NS, "-o", "name").stdout
    assert f"run.{GROUP}/run-128-groups" in listed
    assert f"reservation.{GROUP}/reservation-example" in listed
    assert f"budget.{GROUP}/west-h100" in listed


def test_plain_leases_means_coordination_so_use_the_full_name(kc: ControlPlane) -> None:
    create(kc, lease("name-clash-lease"))
    full = kc.kubectl("get", f"leases.{GROUP}", "-o", "name").stdout
    assert f"lease.{GROUP}/name-clash-lease" in full
    assert "name-clash-lease" in kc.kubectl("get", "gl", "-o", "name").stdout
    plain = kc.kubectl("get", "leases", "-A", "-o", "name").stdout
    assert "name-clash-lease" not in plain


def test_printer_columns(kc: ControlPlane) -> None:
    kc.kubectl("apply", "-n", NS, "-f", str(REPO / "config/samples/runs/run-128-groups.yaml"))
    header = kc.kubectl("get", "rn", "-n", NS).stdout.splitlines()[0].split()
    assert header == ["NAME", "OWNER", "PHASE", "GPUS", "ALLOCATED", "ETA", "AGE"]
    create(kc, lease("columns-lease"))
    rows = kc.kubectl("get", "gl", "columns-lease").stdout.splitlines()
    assert rows[0].split() == [
        "NAME",
        "OWNER",
        "RUN",
        "ROLE",
        "GPUS",
        "ENVELOPE",
        "CLOSED",
        "CLOSURE",
        "AGE",
    ]
    assert rows[1].split()[:6] == [
        "columns-lease",
        "org:ai:rai:sys",
        "run-128-groups",
        "Active",
        "8",
        "west-h100-nv-a",
    ]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_naming_the_field(kc: ControlPlane, path: Path) -> None:
    expects = expectations(path)
    assert expects, f"{path.name} has no '# expect:' line"
    err = rejected(kc, "apply", "--validate=strict", "--dry-run=server", "-n", NS, "-f", str(path))
    for text in expects:
        assert text in err, f"{path.name}: {text!r} not in:\n{err}"


def test_run_spec_changes_are_validated_on_update(kc: ControlPlane) -> None:
    kc.kubectl("apply", "-n", NS, "-f", str(REPO / "config/samples/runs/run-128-groups.yaml"))
    run = "run/run-128-groups"
    kc.kubectl(
        "patch",
        "-n",
        NS,
        run,
        "--type=merge",
        "-p",
        '{"spec":{"malleable":{"desiredTotalGPUs":96}}}',
    )
    err = rejected(
        kc,
        "patch",
        "-n",
        NS,
        run,
        "--type=merge",
        "-p",
        '{"spec":{"malleable":{"desiredTotalGPUs":100}}}',
    )
    assert "spec.malleable.desiredTotalGPUs" in err and "multiple of stepGPUs" in err


def test_reservation_spec_is_immutable(kc: ControlPlane) -> None:
    doc = yaml.safe_load(
        (REPO / "config/samples/reservations/reservation-example.yaml").read_text()
    )
    doc["metadata"] = {"name": "immutable-resv", "labels": {"jobtree.test/suite": "api-crds"}}
    create(kc, doc, "-n", NS)
    resv = "reservation/immutable-resv"
    for spec in (
        {"earliestStart": "2031-01-01T00:00:00Z"},
        {"intendedSlice": {"nodes": ["gpu-a-09"]}},
        {"payingEnvelope": "vision-lending/vision-h100-nv-b"},
    ):
        err = rejected(
            kc, "patch", "-n", NS, resv, "--type=merge", "-p", json.dumps({"spec": spec})
        )
        assert "spec: Invalid value" in err and "spec is immutable" in err
    # Metadata and status still change: only the promise itself is frozen.
    kc.kubectl("label", "-n", NS, resv, "touched=yes")
    patch_status(kc, {"state": "Pending", "countdownSeconds": 42}, "-n", NS, resv)
    assert get_json(kc, "-n", NS, resv)["status"]["countdownSeconds"] == 42


def test_lease_spec_is_immutable(kc: ControlPlane) -> None:
    create(kc, lease("immutable-lease"))
    for spec in (
        {"slice": {"gpus": 4}},
        {"paidByEnvelope": "vision-h100-nv-b"},
        {"interval": {"start": "2026-11-28T09:00:00Z"}},
        {"compPath": ["SHARD[2]"]},
    ):
        err = rejected(
            kc, "patch", "gl", "immutable-lease", "--type=merge", "-p", json.dumps({"spec": spec})
        )
        assert "spec is immutable" in err
    kc.kubectl("label", "gl", "immutable-lease", "audited=yes")


def test_closed_lease_never_reopens(kc: ControlPlane) -> None:
    create(kc, lease("reopen-lease"))
    target = "gl/reopen-lease"
    patch_status(kc, {"closed": False}, target)
    patch_status(kc, CLOSED, target)
    err = patch_status(kc, {"closed": False}, target, check=False)
    assert "status.closed" in err and "never reopens" in err
    err = patch_status(kc, None, target, check=False)
    assert "status.closed" in err and "never reopens" in err
    err = patch_status(kc, {"endTime": "2026-11-28T13:00:00Z"}, target, check=False)
    assert "status.endTime is immutable once set" in err
    err = patch_status(kc, {"closureReason": "Fail"}, target, check=False)
    assert "status.closureReason is immutable once set" in err
    assert get_json(kc, "gl", "reopen-lease")["status"] == CLOSED


@pytest.mark.parametrize(
    ("status", "expect"),
    [
        ({"closed": True}, "status.closed"),
        (
            {"closed": True, "endTime": "2026-11-28T12:00:00Z", "closureReason": "Evicted"},
            "status.closureReason",
        ),
        (
            {"closed": True, "endTime": "2026-11-28T12:00:00Z", "closureReason": "RandomPreempt()"},
            "status.closureReason",
        ),
        (
            {"closed": True, "endTime": "2026-11-28T09:00:00Z", "closureReason": "Completed"},
            "status.endTime must not be before spec.interval.start",
        ),
        ({"endTime": "2026-11-28T12:00:00Z"}, "endTime may only be set when closed is true"),
    ],
)
def test_lease_status_is_validated(kc: ControlPlane, status: dict[str, Any], expect: str) -> None:
    name = "status-lease"
    kc.kubectl("delete", "gl", name, "--ignore-not-found")
    create(kc, lease(name))
    assert expect in patch_status(kc, status, f"gl/{name}", check=False)


def test_random_preempt_closure_names_the_seed(kc: ControlPlane) -> None:
    create(kc, lease("preempted-lease"))
    seed = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    status = {**CLOSED, "closureReason": f"RandomPreempt({seed})"}
    patch_status(kc, status, "gl/preempted-lease")
    assert (
        get_json(kc, "gl", "preempted-lease")["status"]["closureReason"] == f"RandomPreempt({seed})"
    )
