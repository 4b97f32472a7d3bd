"""ClusterCache against the real API server: real Nodes (KWOK), Budgets, Runs, Reservations and
Leases become a ClusterState, and later changes update it incrementally."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from shared.engine.bindplan import LeaseIntent
from shared.engine.model import FundingKind, LeaseReason, Role
from shared.engine.state import Settings
from shared.kube.cache import ClusterCache
from shared.kube.client import make_client
from shared.kube.informer import EventType, Obj
from shared.kube.resources import BUDGETS, GPU_LEASES, NODES, PODS, RESERVATIONS, RUNS
from shared.kube.translate import ANNOTATION_GPUS, lease_manifest, rfc3339
from shared.kube.writer import create, delete, patch_status
from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace

pytestmark = pytest.mark.kube
session_loop = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parents[2]
NS = "jobtree-cache-test"
SUITE = {"jobtree.test/suite": "cache"}
SELECTOR = "jobtree.test/suite=cache"
DOMAIN = ("us-west", "gpu-c", "nv-c")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CRDS = ("runs", "budgets", "reservations", "leases")


@pytest.fixture(scope="module")
def cluster(crds: ControlPlane) -> Iterator[ControlPlane]:
    """CRDs installed and a namespace of our own."""
    kube = crds
    ensure_namespace(kube, NS)
    yield kube
    kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
    for kind in ("nodes", "budgets.rq.davidlangworthy.io", "leases.rq.davidlangworthy.io"):
        kube.kubectl("delete", kind, "-l", SELECTOR, "--wait=false", check=False)


@pytest.fixture(scope="module")
async def api(cluster: ControlPlane) -> AsyncIterator[ApiClient]:
    client = await make_client(str(cluster.kubeconfig))
    yield client
    await client.close()


def gpu_node(name: str, *, gpus: int = 8, fabric: str | None = "nv-c") -> dict[str, Any]:
    """A KWOK-managed node; ``fabric=None`` leaves out a required topology label."""
    labels = {"region": DOMAIN[0], "cluster": DOMAIN[1], "gpu.flavor": "H100-80GB", **SUITE}
    if fabric is not None:
        labels["fabric.domain"] = fabric
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"}, "labels": labels},
        "status": {"allocatable": resources, "capacity": resources},
    }


def budget() -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Budget",
        "metadata": {"name": "cache-budget", "labels": dict(SUITE)},
        "spec": {
            "owner": "org:cache:team",
            "envelopes": [
                {
                    "name": "west",
                    "flavor": "H100-80GB",
                    "selector": {"region": DOMAIN[0], "cluster": DOMAIN[1]},
                    "concurrency": 64,
                }
            ],
            "aggregateCaps": [
                {"name": "all", "flavor": "H100-80GB", "envelopes": ["west"], "maxConcurrency": 32}
            ],
        },
    }


def run_obj(name: str, gpus: int = 8) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": NS, "labels": dict(SUITE)},
        "spec": {
            "owner": "org:cache:team",
            "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus},
            "runtime": {"maxDuration": "2h"},
        },
    }


def reservation() -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Reservation",
        "metadata": {
            "name": "cache-resv",
            "namespace": NS,
            "labels": dict(SUITE),
            "annotations": {ANNOTATION_GPUS: "8"},
        },
        "spec": {
            "runRef": {"name": "cache-waiting"},
            "intendedSlice": {
                "domain": dict(zip(("region", "cluster", "fabric.domain"), DOMAIN, strict=True)),
                "nodes": ["cache-n2"],
            },
            "payingEnvelope": "cache-budget/west",
            "earliestStart": rfc3339(T0 + timedelta(hours=3)),
        },
    }


def lease(name: str, node: str, gpus: int, *, run: str = "cache-running") -> dict[str, Any]:
    intent = LeaseIntent(
        name=name,
        run=(NS, run),
        owner="org:cache:team",
        node=node,
        gpus=gpus,
        role=Role.ACTIVE,
        group=0,
        rank=0,
        envelope="cache-budget/west",
        payer_owner="org:cache:team",
        funding=FundingKind.OWNED,
        start=T0,
        reason=LeaseReason.START,
        expected_end=T0 + timedelta(hours=2),
        comp_path=("GROUP[0]", "RANK[0]"),
    )
    manifest = lease_manifest(intent, run_uid="uid", gen=1)
    manifest["metadata"]["labels"].update(SUITE)
    return manifest


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def cache(api: ApiClient) -> AsyncIterator[ClusterCache]:
    """A started cache over objects that existed before it (the cold-start path)."""
    for name, gpus in (("cache-n1", 8), ("cache-n2", 8)):
        await create(api, NODES, gpu_node(name, gpus=gpus))
    await create(api, NODES, gpu_node("cache-unlabelled", fabric=None))
    await create(api, BUDGETS, budget())
    for name in ("cache-running", "cache-waiting"):
        await create(api, RUNS, run_obj(name))
    await create(api, RESERVATIONS, reservation())
    await create(api, GPU_LEASES, lease("cache-lease-open", "cache-n1", 6))
    await create(api, GPU_LEASES, lease("cache-lease-done", "cache-n2", 2))
    closing = {
        "closed": True,
        "endTime": rfc3339(T0 + timedelta(hours=1)),
        "closureReason": "Completed",
    }
    await patch_status(api, GPU_LEASES, "cache-lease-done", closing, field_manager="jobtree-test")
    built = ClusterCache(api, namespace=NS, label_selector=SELECTOR)
    await built.start()
    await built.wait_ready(timeout=30)
    yield built
    await built.stop()


@session_loop
async def test_snapshot_from_real_objects(cache: ClusterCache) -> None:
    await eventually(
        lambda: all(
            (n := cache.topology.node(x)) is not None and n.ready for x in ("cache-n1", "cache-n2")
        )
    )
    state = cache.snapshot(T0 + timedelta(hours=1, minutes=30), Settings())
    topo = state.topology
    assert {n.name for n in topo} == {"cache-n1", "cache-n2"}
    assert (topo.free("cache-n1"), topo.free("cache-n2")) == (2, 8), "closed leases hold nothing"
    assert topo.domains("H100-80GB") == {DOMAIN: 10}
    assert cache.missing_label_nodes == 1
    assert cache.missing_labels["cache-unlabelled"].missing == ("fabric.domain",)
    assert [b.name for b in state.family.budgets] == ["cache-budget"]
    assert state.family.caps_for("cache-budget/west")[0].key == "cache-budget/all"
    assert [(x.name, x.open) for x in state.ledger] == [
        ("cache-lease-done", False),
        ("cache-lease-open", True),
    ]
    assert state.usage.concurrency("cache-budget/west") == 6
    assert state.usage.gpu_hours("cache-budget/west") == pytest.approx(2 * 1 + 6 * 1.5)
    assert set(state.runs) == {(NS, "cache-running"), (NS, "cache-waiting")}
    assert state.runs[(NS, "cache-running")].max_duration == timedelta(hours=2)
    (claim,) = state.claims
    assert (claim.name, claim.run, claim.gpus, claim.nodes) == (
        "cache-resv",
        (NS, "cache-waiting"),
        8,
        ("cache-n2",),
    )
    assert [o["metadata"]["name"] for o in cache.lease_objects_of((NS, "cache-running"))] == [
        "cache-lease-done",
        "cache-lease-open",
    ]
    run = cache.run_object((NS, "cache-running"))
    assert run is not None and run["spec"]["resources"]["totalGPUs"] == 8
    node = cache.node_object("cache-n1")
    assert node is not None and node["kind"] == "Node"
    assert [o["metadata"]["name"] for o in cache.reservation_objects()] == ["cache-resv"]


@session_loop
async def test_changes_update_the_views_incrementally(
    cache: ClusterCache, api: ApiClient, cluster: ControlPlane
) -> None:
    seen: list[tuple[EventType, str, int]] = []

    def listener(event: EventType, obj: Obj, old: Obj | None) -> None:
        # The cache's own listener runs first: its views already include this event.
        seen.append((event, obj["metadata"]["name"], cache.topology.used("cache-n2")))

    cache.add_listener("leases", listener)
    before = cache.version
    first_topology = cache.snapshot(datetime.now(UTC)).topology

    await create(api, GPU_LEASES, lease("cache-lease-new", "cache-n2", 4))
    await eventually(lambda: cache.topology.free("cache-n2") == 4)
    assert seen == [("ADDED", "cache-lease-new", 4)]
    assert cache.version > before
    assert first_topology.free("cache-n2") == 8, "earlier snapshots never change"

    closing = {"closed": True, "endTime": rfc3339(T0 + timedelta(hours=1)), "closureReason": "Fail"}
    await patch_status(api, GPU_LEASES, "cache-lease-new", closing, field_manager="jobtree-test")
    await eventually(lambda: cache.topology.free("cache-n2") == 8)
    assert "cache-lease-new" in {x.name for x in cache.snapshot(datetime.now(UTC)).ledger}

    cluster.kubectl("cordon", "cache-n2")
    await eventually(lambda: (n := cache.topology.node("cache-n2")) is not None and n.cordoned)
    assert cache.topology.free("cache-n2") == 0

    cluster.kubectl("label", "node", "cache-unlabelled", "fabric.domain=nv-c")
    await eventually(lambda: "cache-unlabelled" in cache.topology)
    assert cache.missing_label_nodes == 0

    await delete(api, NODES, "cache-n1")
    await eventually(lambda: "cache-n1" not in cache.topology)
    assert cache.topology.orphan_usage() == {"cache-n1": 6}, "its open lease is still counted"

    await delete(api, RESERVATIONS, "cache-resv", NS)
    await eventually(lambda: cache.snapshot(datetime.now(UTC)).claims == ())

    await delete(api, BUDGETS, "cache-budget")
    await eventually(lambda: cache.snapshot(datetime.now(UTC)).family.budgets == ())


@session_loop
async def test_status_only_updates_do_not_bump_the_version(
    cache: ClusterCache, api: ApiClient
) -> None:
    await eventually(lambda: (NS, "cache-waiting") in cache.snapshot(datetime.now(UTC)).runs)
    before = cache.version
    informer = cache.informer("runs")
    rv = informer.resource_version
    await patch_status(
        api,
        RUNS,
        "cache-waiting",
        {"phase": "Reserved"},
        namespace=NS,
        field_manager="jobtree-test",
    )
    await eventually(lambda: informer.resource_version != rv)
    await asyncio.sleep(0.2)
    assert cache.version == before


@session_loop
async def test_pods_bound_to_nodes_are_counted_from_a_slim_copy(
    cache: ClusterCache, api: ApiClient, cluster: ControlPlane
) -> None:
    await create(api, NODES, gpu_node("cache-n3"))
    await eventually(lambda: cache.topology.free("cache-n3") == 8)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cache-notebook", "namespace": NS, "labels": {"app": "notebook"}},
        "spec": {
            "nodeName": "cache-n3",
            "initContainers": [
                {"name": "fetch", "image": "pause", "resources": {"requests": {"cpu": "6"}}}
            ],
            "containers": [
                {
                    "name": "c",
                    "image": "pause",
                    "resources": {
                        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "3"},
                        "limits": {"nvidia.com/gpu": "3"},
                    },
                }
            ],
        },
    }
    await create(api, PODS, pod)
    await eventually(lambda: cache.topology.free("cache-n3") == 5)
    load = cache.topology.load("cache-n3")
    assert (load.gpus, load.cpu, load.memory, load.pods) == (3, 6000, 8 * 2**30, 1)
    slim = cache.objects("pods")[f"{NS}/cache-notebook"]
    assert set(slim) == {"apiVersion", "kind", "metadata", "usage"}, "only what capacity needs"
    cluster.kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Running",
        "pod/cache-notebook",
        "-n",
        NS,
        "--timeout=60s",
    )
    cluster.kubectl(
        "patch",
        "pod",
        "cache-notebook",
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Succeeded"}}',
    )
    await eventually(lambda: cache.topology.free("cache-n3") == 8)
    assert f"{NS}/cache-notebook" not in cache.objects("pods"), "terminal pods leave the watch"
    cluster.kubectl("delete", "pod", "cache-notebook", "-n", NS, "--force", "--grace-period=0")
    await delete(api, NODES, "cache-n3")


@session_loop
async def test_assumed_pods_count_at_once_and_once_when_the_watch_shows_them(
    cache: ClusterCache, api: ApiClient, cluster: ControlPlane
) -> None:
    await create(api, NODES, gpu_node("cache-n4"))
    await eventually(lambda: cache.topology.free("cache-n4") == 8)
    gib = 2**30
    created = (f"{NS}/cache-rank", "cache-n4", (0, 4000, 16 * gib, 0))
    never = (f"{NS}/cache-never", "cache-n4", (0, 1000, 1 * gib, 0))
    cache.assume_pods([created, never])
    load = cache.topology.load("cache-n4")
    assert (load.cpu, load.memory, load.pods) == (5000, 17 * gib, 2), "counted before the watch"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cache-rank", "namespace": NS},
        "spec": {
            "nodeName": "cache-n4",
            "containers": [
                {
                    "name": "c",
                    "image": "pause",
                    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}},
                }
            ],
        },
    }
    await create(api, PODS, pod)
    await eventually(lambda: f"{NS}/cache-rank" in cache.objects("pods"))
    load = cache.topology.load("cache-n4")
    assert (load.cpu, load.memory, load.pods) == (5000, 17 * gib, 2), (
        "the watch did not add it twice"
    )
    cache.forget_pods([created, never])  # only the pod the watch does not show is taken back
    load = cache.topology.load("cache-n4")
    assert (load.cpu, load.memory, load.pods) == (4000, 16 * gib, 1)
    cluster.kubectl("delete", "pod", "cache-rank", "-n", NS, "--force", "--grace-period=0")
    await eventually(lambda: cache.topology.load("cache-n4").pods == 0)
    await delete(api, NODES, "cache-n4")
