"""Pure conversions between API objects and engine records (shared.kube.translate)."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.api import Lease as ApiLease
from shared.api import parse_object
from shared.engine import model as m
from shared.engine.bindplan import BindIntent, PodIntent, bind_plan, to_leases
from shared.engine.model import FundingKind, LeaseReason, Malleable, Role
from shared.engine.offers import Funding
from shared.engine.pack import Placement, pack
from shared.engine.topology import MissingLabels
from shared.kube.translate import (
    ANNOTATION_CAPACITY_HOLD,
    ANNOTATION_EXPECTED_END,
    ANNOTATION_GPUS,
    LABEL_FUNDING,
    LABEL_RUN_UID,
    TranslateError,
    budget_record,
    claim_record,
    comp_position,
    headless_service,
    lease_manifest,
    lease_record,
    node_record,
    parse_time,
    pod_manifest,
    pod_usage,
    reservation_run_key,
    rfc3339,
    run_request,
    service_name,
    slim_pod,
    slim_usage,
)

from .engine.fleet import T0, envelope, node, offer, run, topo

SAMPLES = Path(__file__).resolve().parents[2] / "config" / "samples"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABELS = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a", "gpu.flavor": "H100"}


def sample(path: str, **meta: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((SAMPLES / path).read_text())
    obj["metadata"].update(meta)
    return obj


def node_obj(
    *,
    labels: dict[str, str] | None = None,
    ready: str | None = "True",
    unschedulable: bool = False,
    allocatable: dict[str, str] | None = None,
) -> dict[str, Any]:
    conditions = [{"type": "MemoryPressure", "status": "False"}]
    if ready is not None:
        conditions.append({"type": "Ready", "status": ready})
    return {
        "metadata": {"name": "n1", "labels": LABELS if labels is None else labels},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {
            "conditions": conditions,
            "allocatable": {"cpu": "32", "nvidia.com/gpu": "8"}
            if allocatable is None
            else allocatable,
        },
    }


# ---------------------------------------------------------------------------- nodes


def test_ready_node_with_gpus() -> None:
    rec = node_record(node_obj())
    assert not isinstance(rec, MissingLabels)
    assert (rec.name, rec.gpus, rec.flavor, rec.domain) == (
        "n1",
        8,
        "H100",
        ("us-west", "gpu-a", "nv-a"),
    )
    assert rec.ready and not rec.cordoned and rec.schedulable


@pytest.mark.parametrize("ready", ["False", "Unknown", None])
def test_node_not_ready_unless_ready_condition_true(ready: str | None) -> None:
    rec = node_record(node_obj(ready=ready))
    assert not isinstance(rec, MissingLabels) and not rec.ready and not rec.schedulable


def test_cordoned_node_keeps_gpus_but_is_not_schedulable() -> None:
    rec = node_record(node_obj(unschedulable=True))
    assert not isinstance(rec, MissingLabels)
    assert rec.cordoned and rec.ready and rec.gpus == 8 and not rec.schedulable


def test_gpu_resource_name_is_configurable() -> None:
    obj = node_obj(allocatable={"amd.com/gpu": "4"})
    amd = node_record(obj, resource="amd.com/gpu")
    nvidia = node_record(obj)
    assert not isinstance(amd, MissingLabels) and not isinstance(nvidia, MissingLabels)
    assert (amd.gpus, nvidia.gpus) == (4, 0)


def test_node_missing_labels_is_reported_not_raised() -> None:
    rec = node_record(node_obj(labels={"region": "us-west", "gpu.flavor": "H100"}))
    assert rec == MissingLabels(node="n1", missing=("cluster", "fabric.domain"))


def test_nameless_node_is_a_translate_error() -> None:
    with pytest.raises(TranslateError):
        node_record({"metadata": {}})


# ---------------------------------------------------------------------------- budgets


def test_budget_envelopes_caps_and_windows() -> None:
    budget = budget_record(sample("budgets/budget-west-h100.yaml"))
    assert (budget.name, budget.owner, budget.parents) == ("west-h100", "org:ai:rai:sys", ())
    standing, sprint = budget.envelopes
    assert standing.key == "west-h100/west-h100-nv-a"
    assert standing.concurrency == 96 and standing.start is None and standing.max_gpu_hours is None
    assert dict(standing.selector) == {
        "region": "us-west",
        "cluster": "gpu-a",
        "fabric.domain": "nv-a",
    }
    assert sprint.start == datetime(2030, 1, 7, tzinfo=UTC) and sprint.start.tzinfo is not None
    assert sprint.end == datetime(2030, 1, 21, tzinfo=UTC)
    assert sprint.max_gpu_hours == 20000
    assert sprint.reservations_before_start and not sprint.admission_before_start
    assert not standing.reservations_before_start and not standing.lending.allow
    (cap,) = budget.caps
    assert cap.key == "west-h100/west-h100-total"
    assert cap.envelopes == ("west-h100/west-h100-nv-a", "west-h100/west-h100-sprint")
    assert (cap.max_concurrency, cap.max_gpu_hours) == (128, None)


def test_budget_lending_and_explicit_parents() -> None:
    obj = sample("budgets/budget-vision-lending.yaml")
    obj["spec"]["parents"] = ["lab", "org:ai"]
    budget = budget_record(obj)
    assert budget.parents == ("lab", "org:ai")
    lending = budget.envelopes[0].lending
    assert (lending.allow, lending.to, lending.max_concurrency, lending.max_gpu_hours) == (
        True,
        ("org:ai:*",),
        32,
        4000,
    )


def test_invalid_budget_is_a_translate_error() -> None:
    obj = sample("budgets/budget-west-h100.yaml")
    obj["spec"]["envelopes"][0]["concurrency"] = 0
    with pytest.raises(TranslateError, match="west-h100"):
        budget_record(obj)


# ---------------------------------------------------------------------------- runs


def test_malleable_run_request() -> None:
    req = run_request(sample("runs/run-128-groups.yaml", namespace="research", uid="u-1"))
    assert req.key == ("research", "run-128-groups") and req.uid == "u-1"
    assert (req.owner, req.flavor, req.total_gpus, req.group_gpus) == (
        "org:ai:rai:sys",
        "H100-80GB",
        128,
        32,
    )
    assert req.malleable == Malleable(min_gpus=64, max_gpus=128, step_gpus=32, desired_gpus=128)
    assert req.max_duration == timedelta(hours=4) and req.checkpoint == timedelta(minutes=30)
    assert req.max_restarts == 2
    assert (req.allow_borrow, req.max_borrow_gpus, req.sponsors) == (True, 32, ("org:vision",))
    assert req.allow_cross_group_spread and dict(req.selector) == {} and not req.opportunistic


def test_desired_width_defaults_to_max() -> None:
    obj = sample("runs/run-128-groups.yaml", namespace="research")
    del obj["spec"]["malleable"]["desiredTotalGPUs"]
    obj["spec"]["resources"]["totalGPUs"] = 64
    req = run_request(obj)
    assert req.total_gpus == 64
    assert req.malleable is not None and req.malleable.desired_gpus == 128


def test_minimal_run_defaults() -> None:
    obj = {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": "tiny", "namespace": "ns"},
        "spec": {"owner": "org:a", "resources": {"gpuType": "H100", "totalGPUs": 8}},
    }
    req = run_request(obj)
    assert req.uid == "" and req.group_gpus is None and req.allow_cross_group_spread
    assert (req.spares_per_group, req.max_restarts, req.max_duration, req.checkpoint) == (
        0,
        0,
        None,
        None,
    )
    assert (req.allow_borrow, req.max_borrow_gpus, req.sponsors, req.malleable) == (
        False,
        None,
        (),
        None,
    )


def test_run_selector_spares_and_opportunistic() -> None:
    obj = sample("runs/run-with-template.yaml", namespace="ns")
    obj["spec"]["opportunistic"] = True
    req = run_request(obj)
    assert dict(req.selector) == {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"}
    assert req.opportunistic and req.max_duration == timedelta(hours=1, minutes=30)
    spares = run_request(sample("runs/run-with-spares.yaml", namespace="ns"))
    assert spares.spares_per_group == 8 and not spares.allow_cross_group_spread


def test_run_without_namespace_or_valid_spec_is_rejected() -> None:
    with pytest.raises(TranslateError, match="namespace"):
        run_request(sample("runs/run-with-spares.yaml"))
    bad = sample("runs/run-with-spares.yaml", namespace="ns")
    bad["spec"]["resources"]["totalGPUs"] = "32"
    with pytest.raises(TranslateError, match="totalGPUs"):
        run_request(bad)


# ---------------------------------------------------------------------------- leases


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (["GROUP[0]", "RANK[3]"], (0, 3)),
        (["GROUP[2]", "SPARE[1]"], (2, -1)),
        (["SHARD[1]", "D"], (0, -1)),
        (None, (0, -1)),
    ],
)
def test_comp_position(path: list[str] | None, expected: tuple[int, int]) -> None:
    assert comp_position(path) == expected


def bind_with_spares_and_three_payers() -> BindIntent:
    """Two groups with a spare each; owned, family and sponsor payers; a walltime."""
    nodes = [node(f"n{i}") for i in range(1, 7)]
    fund = Funding(
        (
            offer(envelope("own"), 16),
            offer(envelope("fam", budget="parent", owner="org:ai"), 8, kind=FundingKind.FAMILY),
            offer(envelope("lend", budget="lab", owner="lab:x"), 100, kind=FundingKind.SPONSOR),
        )
    )
    req = run(total=32, group=16, spares=8, max_duration=timedelta(hours=2))
    placement = pack(req, topo(nodes), fund)
    assert isinstance(placement, Placement)
    now = T0 + timedelta(microseconds=123456)
    return bind_plan(req, placement, now=now, reason=LeaseReason.START, generation=3)


def test_lease_manifest_validates_and_round_trips_to_the_engine_lease() -> None:
    intent = bind_with_spares_and_three_payers()
    expected = to_leases(intent)
    assert {lease.funding for lease in expected} == set(FundingKind)
    assert {lease.role for lease in expected} == {Role.ACTIVE, Role.SPARE}
    for li, want in zip(intent.leases, expected, strict=True):
        manifest = lease_manifest(li, run_uid="uid-1", gen=3)
        parsed = parse_object(manifest)
        assert isinstance(parsed, ApiLease)
        assert parsed.spec.comp_path == list(li.comp_path)
        assert lease_record(manifest) == want


def test_lease_manifest_metadata_makes_audits_label_queries() -> None:
    li = bind_with_spares_and_three_payers().leases[0]
    manifest = lease_manifest(li, budget="team-a", run_uid="uid-1", gen=3)
    meta = manifest["metadata"]
    assert meta["name"] == li.name
    assert meta["labels"] == {
        "rq.davidlangworthy.io/run": "train",
        "rq.davidlangworthy.io/namespace": "research",
        "rq.davidlangworthy.io/owner": "org.ai.team-a",
        "rq.davidlangworthy.io/envelope": "own",
        "rq.davidlangworthy.io/budget": "team-a",
        "rq.davidlangworthy.io/node": li.node,
        "rq.davidlangworthy.io/role": "Active",
        LABEL_FUNDING: "owned",
        LABEL_RUN_UID: "uid-1",
    }
    assert meta["annotations"][ANNOTATION_EXPECTED_END] == "2026-01-01T02:00:00.123456Z"
    assert meta["annotations"]["rq.davidlangworthy.io/run-generation"] == "3"
    spec = manifest["spec"]
    assert spec["interval"] == {"start": "2026-01-01T00:00:00.123456Z"}
    assert (spec["paidByBudget"], spec["paidByEnvelope"], spec["paidByOwner"]) == (
        "team-a",
        "own",
        "org:ai:team-a",
    )
    assert "status" not in manifest


def test_lease_manifest_rejects_a_conflicting_budget() -> None:
    li = bind_with_spares_and_three_payers().leases[0]
    with pytest.raises(ValueError, match="budget"):
        lease_manifest(li, budget="someone-else", run_uid="u", gen=0)


def closed(manifest: dict[str, Any], end: datetime, reason: str) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    out["status"] = {"closed": True, "endTime": rfc3339(end), "closureReason": reason}
    return out


def test_closed_lease_carries_end_and_closure() -> None:
    li = bind_with_spares_and_three_payers().leases[0]
    manifest = lease_manifest(li, run_uid="u", gen=0)
    end = T0 + timedelta(hours=1)
    rec = lease_record(closed(manifest, end, "RandomPreempt(abc123)"))
    assert (rec.end, rec.closure, rec.open) == (end, "RandomPreempt(abc123)", False)
    assert lease_record(manifest).open


def test_lease_without_metadata_extras_derives_funding_and_no_expected_end() -> None:
    manifest = lease_manifest(bind_with_spares_and_three_payers().leases[0], run_uid="u", gen=0)
    manifest["metadata"] = {"name": manifest["metadata"]["name"]}
    rec = lease_record(manifest)
    assert (rec.funding, rec.expected_end) == (FundingKind.OWNED, None)
    manifest["spec"]["paidByOwner"] = "org:ai"
    assert lease_record(manifest).funding is FundingKind.FAMILY
    manifest["metadata"]["annotations"] = {ANNOTATION_EXPECTED_END: "soon"}
    with pytest.raises(TranslateError, match="expected-end"):
        lease_record(manifest)


# ---------------------------------------------------------------------------- reservations


def reservation(**meta: Any) -> dict[str, Any]:
    return sample("reservations/reservation-example.yaml", namespace="research", **meta)


def test_claim_from_gpus_annotation() -> None:
    claim = claim_record(reservation(annotations={ANNOTATION_GPUS: "48"}))
    assert claim is not None
    assert (claim.name, claim.run, claim.gpus) == (
        "reservation-example",
        ("research", "run-128-groups"),
        48,
    )
    assert claim.earliest_start == datetime(2025, 1, 6, 9, tzinfo=UTC)
    assert claim.nodes == tuple(f"gpu-a-0{i}" for i in range(1, 9))
    assert claim.envelope == "west-h100/west-h100-nv-a"


def test_admin_claim_without_annotation_holds_the_runs_narrowest_start() -> None:
    req = run_request(sample("runs/run-128-groups.yaml", namespace="research"))
    claim = claim_record(reservation(), req)
    assert claim is not None and claim.gpus == 64
    with pytest.raises(TranslateError, match="no Run"):
        claim_record(reservation())
    with pytest.raises(TranslateError, match="gpus"):
        claim_record(reservation(annotations={ANNOTATION_GPUS: "-1"}))


@pytest.mark.parametrize(
    ("state", "claims"),
    [
        ("Pending", True),
        ("Active", True),
        ("Released", False),
        ("Blocked", False),
        ("Canceled", False),
    ],
)
def test_only_pending_and_active_reservations_claim(state: str, claims: bool) -> None:
    obj = reservation(annotations={ANNOTATION_GPUS: "8"})
    obj["status"] = {"state": state}
    assert (claim_record(obj) is not None) == claims


def test_reservation_run_key_prefers_explicit_namespace() -> None:
    obj = reservation()
    assert reservation_run_key(obj) == ("research", "run-128-groups")
    obj["spec"]["runRef"]["namespace"] = "other"
    assert reservation_run_key(obj) == ("other", "run-128-groups")


# ---------------------------------------------------------------------------- pods and services


def run_obj(path: str = "runs/run-with-template.yaml") -> dict[str, Any]:
    return sample(path, namespace="research", uid="run-uid-1")


def pod_intent(run_name: str = "run-with-template", rank: int = 1) -> PodIntent:
    return PodIntent(
        name=f"{run_name}-g0-r{rank}",
        run=("research", run_name),
        node="gpu-a-01",
        gpus=8,
        group=0,
        rank=rank,
        role=Role.ACTIVE,
        world_size=2,
        master=f"{run_name}-g0-r0",
    )


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_pod_from_template_is_bound_labelled_and_owned() -> None:
    obj = run_obj()
    obj["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "RANK", "value": "99"},
        {"name": "KEEP", "value": "me"},
    ]
    obj["spec"]["template"]["spec"]["containers"].append(
        {"name": "sidecar", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    )
    before = copy.deepcopy(obj)
    pod = pod_manifest(pod_intent(), obj, service_name="run-with-template")
    assert obj == before, "the Run object must not be mutated"
    meta, spec = pod["metadata"], pod["spec"]
    assert (meta["name"], meta["namespace"]) == ("run-with-template-g0-r1", "research")
    assert meta["labels"] == {
        "app": "llm-finetune",
        "rq.davidlangworthy.io/run": "run-with-template",
        "rq.davidlangworthy.io/group": "0",
        "rq.davidlangworthy.io/rank": "1",
        "rq.davidlangworthy.io/role": "Active",
    }
    assert "annotations" not in meta
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "rq.davidlangworthy.io/v1",
            "kind": "Run",
            "name": "run-with-template",
            "uid": "run-uid-1",
            "controller": True,
            "blockOwnerDeletion": False,
        }
    ]
    assert (spec["nodeName"], spec["restartPolicy"]) == ("gpu-a-01", "Never")
    assert (spec["hostname"], spec["subdomain"]) == ("run-with-template-g0-r1", "run-with-template")
    assert "tolerations" not in spec, "production pods carry only the template's tolerations"
    trainer, sidecar = spec["containers"]
    assert trainer["resources"] == {
        "requests": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"},
        "limits": {"nvidia.com/gpu": "8"},
    }
    assert sidecar["resources"] == {"limits": {}}
    assert env_of(trainer) == {
        "KEEP": "me",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "GROUP": "0",
        "MASTER_ADDR": "run-with-template-g0-r0.run-with-template.research.svc",
        "MASTER_PORT": "29500",
    }
    assert env_of(sidecar)["RANK"] == "1"
    assert spec["volumes"] == [{"name": "checkpoints", "emptyDir": {}}]


def test_pod_without_template_is_a_marked_capacity_hold() -> None:
    pod = pod_manifest(
        pod_intent("run-with-spares", rank=0),
        run_obj("runs/run-with-spares.yaml"),
        resource="amd.com/gpu",
        hold_image="example.com/hold:1",
        service_name="svc",
    )
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "example.com/hold:1" and container["name"] == "capacity-hold"
    assert container["resources"] == {"limits": {"amd.com/gpu": "8"}}
    assert pod["metadata"]["annotations"] == {ANNOTATION_CAPACITY_HOLD: "true"}
    assert env_of(container)["MASTER_ADDR"] == "run-with-spares-g0-r0.svc.research.svc"


def test_pod_for_another_run_or_unowned_run_is_refused() -> None:
    with pytest.raises(ValueError, match="belongs to"):
        pod_manifest(pod_intent("other"), run_obj(), service_name="s")
    obj = run_obj()
    del obj["metadata"]["uid"]
    with pytest.raises(TranslateError, match="uid"):
        pod_manifest(pod_intent(), obj, service_name="s")


def test_headless_service_selects_the_runs_pods() -> None:
    svc = headless_service(run_obj())
    assert svc["metadata"]["name"] == "run-with-template" == service_name("run-with-template")
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "run-uid-1"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"rq.davidlangworthy.io/run": "run-with-template"}
    pod = pod_manifest(pod_intent(), run_obj(), service_name=service_name("run-with-template"))
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("name", ["train.v2", "7b-finetune", "x" * 200, "a.b" + "c" * 70])
def test_service_name_is_a_dns1035_label(name: str) -> None:
    svc = service_name(name)
    assert DNS1035.match(svc) and len(svc) <= 63
    assert service_name(name + "0") != svc


def test_times_round_trip_to_the_microsecond() -> None:
    at = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
    assert rfc3339(at) == "2026-03-04T05:06:07.890123Z"
    assert parse_time(rfc3339(at)) == at
    assert parse_time("2026-03-04T05:06:07") == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


# ---------------------------------------------------------------------------- capacity


def test_node_capacity_and_taints_come_from_the_node() -> None:
    obj = node_obj(
        allocatable={
            "cpu": "31500m",
            "memory": "512Gi",
            "ephemeral-storage": "1Ti",
            "pods": "110",
            "nvidia.com/gpu": "8",
        }
    )
    obj["spec"]["taints"] = [{"key": "maintenance", "effect": "NoSchedule"}]
    record = node_record(obj)
    assert isinstance(record, m.Node)
    assert record.capacity == m.NodeCapacity(31_500, 512 * 2**30, 2**40, 110)
    assert record.taints == (m.Taint("maintenance", "", "NoSchedule"),)
    bare = node_record(node_obj(allocatable={"nvidia.com/gpu": "8"}))
    assert isinstance(bare, m.Node) and bare.capacity == m.NodeCapacity(0, 0, 0, 0)


def test_a_run_template_gives_each_rank_pod_its_needs() -> None:
    obj = run_obj()
    spec = obj["spec"]["template"]["spec"]
    spec["initContainers"] = [{"name": "fetch", "resources": {"limits": {"memory": "300Gi"}}}]
    spec["tolerations"] = [{"key": "maintenance", "operator": "Exists", "effect": "NoSchedule"}]
    spec["nodeSelector"] = {"nic": "cx7"}
    spec["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gen", "operator": "In", "values": ["5"]}]}
                ]
            }
        }
    }
    needs = run_request(obj).pod
    assert (needs.cpu, needs.memory) == (32_000, 300 * 2**30), "init step beats containers"
    assert needs.tolerations == (m.Toleration("maintenance", "Exists", "", "NoSchedule"),)
    assert dict(needs.node_selector) == {"nic": "cx7"}
    assert needs.affinity == ((m.Requirement("gen", "In", ("5",)),),)
    spec["containers"][0]["resources"]["requests"]["memory"] = "lots"
    with pytest.raises(TranslateError, match=r"containers\[0\]\.resources\.requests\.memory"):
        run_request(obj)


def test_pods_count_their_requests_and_foreign_gpus_only() -> None:
    foreign = {
        "metadata": {"name": "nb", "namespace": "lab", "uid": "u1", "resourceVersion": "7"},
        "spec": {
            "nodeName": "n1",
            "containers": [
                {"name": "c", "resources": {"requests": {"cpu": "2", "nvidia.com/gpu": "8"}}}
            ],
            "overhead": {"memory": "1Gi"},
        },
        "status": {"phase": "Running"},
    }
    assert pod_usage(foreign) == ("n1", (8, 2000, 2**30, 0))
    ours = copy.deepcopy(foreign)
    ours["metadata"]["ownerReferences"] = [
        {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "controller": True}
    ]
    assert pod_usage(ours) == ("n1", (0, 2000, 2**30, 0)), "its GPUs are its Lease's"
    done = copy.deepcopy(foreign)
    done["status"]["phase"] = "Succeeded"
    assert pod_usage(done) is None
    unbound = copy.deepcopy(foreign)
    del unbound["spec"]["nodeName"]
    assert pod_usage(unbound) is None
    slim = slim_pod(foreign)
    assert set(slim) == {"apiVersion", "kind", "metadata", "usage"}
    assert slim["metadata"] == foreign["metadata"]
    assert slim_usage(slim) == ("n1", (8, 2000, 2**30, 0))
