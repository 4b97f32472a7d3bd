"""Writes against the real API server: idempotent create, delete, server-side apply of status,
Lease manifests accepted and read back, and pods bound to KWOK nodes that really start."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from shared.engine.bindplan import LeaseIntent, PodIntent
from shared.engine.model import FundingKind, LeaseReason, Role
from shared.kube.client import make_client
from shared.kube.resources import GPU_LEASES, NODES, PODS, RUNS, SERVICES
from shared.kube.translate import (
    headless_service,
    lease_manifest,
    lease_record,
    pod_manifest,
    rfc3339,
    service_name,
)
from shared.kube.writer import KubeError, apply, create, delete, get, patch_status
from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace

pytestmark = pytest.mark.kube
session_loop = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parents[2]
NS = "jobtree-writer-test"
SUITE = {"jobtree.test/suite": "writer"}
NODE = "writer-gpu-node"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def cluster(crds: ControlPlane) -> Iterator[ControlPlane]:
    """CRDs installed and a namespace of our own."""
    kube = crds
    ensure_namespace(kube, NS)
    kube.kubectl("apply", "-f", "-", input=json.dumps(gpu_node(NODE)))
    yield kube
    kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
    for kind in ("nodes", "leases.rq.davidlangworthy.io"):
        kube.kubectl("delete", kind, "-l", "jobtree.test/suite=writer", "--wait=false", check=False)


@pytest.fixture(scope="module")
async def api(cluster: ControlPlane) -> AsyncIterator[ApiClient]:
    client = await make_client(str(cluster.kubeconfig))
    yield client
    await client.close()


def namespace_obj() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}


def gpu_node(name: str) -> dict[str, Any]:
    labels = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-w"}
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {**labels, "gpu.flavor": "H100-80GB", **SUITE},
        },
        "status": {"allocatable": resources, "capacity": resources},
    }


def run_obj(name: str, *, template: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "owner": "org:ai:test",
        "resources": {"gpuType": "H100-80GB", "totalGPUs": 8},
    }
    if template is not None:
        spec["template"] = template
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def lease_intent(name: str, *, node: str = NODE, run: str = "ledger-run") -> LeaseIntent:
    return LeaseIntent(
        name=name,
        run=(NS, run),
        owner="org:ai:test",
        node=node,
        gpus=4,
        role=Role.ACTIVE,
        group=1,
        rank=5,
        envelope="test-budget/west",
        payer_owner="org:ai",
        funding=FundingKind.FAMILY,
        start=T0 + timedelta(microseconds=250),
        reason=LeaseReason.GROW,
        expected_end=T0 + timedelta(hours=4),
        comp_path=("GROUP[1]", "RANK[5]"),
    )


def labelled(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"]["labels"].update(SUITE)
    return manifest


async def eventually_get(
    api: ApiClient, resource: Any, name: str, namespace: str | None, done: Any
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        obj = await get(api, resource, name, namespace)
        if obj is not None and done(obj):
            return obj
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} never got there: {obj}")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------- verbs


@session_loop
async def test_create_is_idempotent_and_delete_tolerates_missing(api: ApiClient) -> None:
    first = await create(api, RUNS, run_obj("twice"))
    again = await create(api, RUNS, run_obj("twice"))
    assert first["metadata"]["uid"] == again["metadata"]["uid"]
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    fetched = await get(api, RUNS, "twice", NS)
    assert fetched is not None and fetched["metadata"]["uid"] == first["metadata"]["uid"]
    assert await delete(api, RUNS, "twice", NS) is True
    assert await delete(api, RUNS, "twice", NS) is False
    assert await get(api, RUNS, "twice", NS) is None


@session_loop
async def test_rejections_are_typed(api: ApiClient) -> None:
    bad = run_obj("bad")
    bad["spec"]["resources"]["totalGPUs"] = 0
    with pytest.raises(KubeError) as info:
        await create(api, RUNS, bad)
    assert (info.value.status, info.value.reason) == (422, "Invalid")
    assert "totalGPUs" in info.value.message
    with pytest.raises(KubeError) as missing:
        await patch_status(api, RUNS, "nope", {"phase": "Running"}, namespace=NS, field_manager="t")
    assert missing.value.status == 404


@session_loop
async def test_make_client_reads_kubeconfig_from_the_environment(
    cluster: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    client = await make_client()
    try:
        assert await get(client, NODES, NODE) is not None
    finally:
        await client.close()


@session_loop
async def test_the_client_trusts_the_environment_only_when_it_names_a_proxy(
    cluster: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trusting the environment makes aiohttp parse ~/.netrc on every request, so it is only
    switched on when a proxy variable is set (a kubeconfig proxy-url applies either way)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    plain = await make_client(str(cluster.kubeconfig))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    proxied = await make_client(str(cluster.kubeconfig))
    try:
        assert plain.rest_client.pool_manager.trust_env is False
        assert await get(plain, NODES, NODE) is not None
        assert proxied.rest_client.pool_manager.trust_env is True
    finally:
        await plain.close()
        await proxied.close()


@session_loop
async def test_status_is_server_side_applied_per_field_manager(api: ApiClient) -> None:
    await create(api, RUNS, run_obj("ssa"))
    await patch_status(
        api,
        RUNS,
        "ssa",
        {"phase": "Reserved", "message": "waiting"},
        namespace=NS,
        field_manager="jobtree-admission",
    )
    await patch_status(
        api,
        RUNS,
        "ssa",
        {"status": {"earliestStart": "2026-01-01T00:00:00Z"}},
        namespace=NS,
        field_manager="jobtree-forecast",
    )
    stored = await patch_status(
        api, RUNS, "ssa", {"phase": "Running"}, namespace=NS, field_manager="jobtree-admission"
    )
    assert stored["status"] == {"phase": "Running", "earliestStart": "2026-01-01T00:00:00Z"}
    fetched = await get(api, RUNS, "ssa", NS)
    assert fetched is not None and fetched["status"] == stored["status"]
    assert fetched["spec"]["resources"]["totalGPUs"] == 8, "status writes leave the spec alone"


@session_loop
async def test_apply_creates_then_updates_a_whole_object(api: ApiClient) -> None:
    body = run_obj("applied")
    first = await apply(api, RUNS, body, field_manager="jobtree-test")
    body["spec"]["resources"]["totalGPUs"] = 16
    second = await apply(api, RUNS, body, field_manager="jobtree-test")
    assert first["metadata"]["uid"] == second["metadata"]["uid"]
    assert second["spec"]["resources"]["totalGPUs"] == 16


# ---------------------------------------------------------------------------- leases


@session_loop
async def test_lease_manifest_is_accepted_and_reads_back_as_the_same_lease(api: ApiClient) -> None:
    intent = lease_intent("writer-lease-open")
    stored = await create(api, GPU_LEASES, labelled(lease_manifest(intent, run_uid="u-1", gen=2)))
    record = lease_record(stored)
    assert record.name == intent.name and record.run == intent.run
    assert (record.node, record.gpus, record.role, record.group, record.rank) == (
        NODE,
        4,
        Role.ACTIVE,
        1,
        5,
    )
    assert (record.envelope, record.payer_owner, record.funding) == (
        "test-budget/west",
        "org:ai",
        FundingKind.FAMILY,
    )
    assert (record.start, record.expected_end, record.reason) == (
        intent.start,
        intent.expected_end,
        LeaseReason.GROW,
    )
    assert record.open
    again = await create(api, GPU_LEASES, labelled(lease_manifest(intent, run_uid="u-1", gen=2)))
    assert lease_record(again) == record


@session_loop
async def test_lease_closes_by_status_apply_and_never_reopens(api: ApiClient) -> None:
    intent = lease_intent("writer-lease-closed")
    await create(api, GPU_LEASES, labelled(lease_manifest(intent, run_uid="u-1", gen=0)))
    end = T0 + timedelta(hours=1, microseconds=7)
    closing = {"closed": True, "endTime": rfc3339(end), "closureReason": "NodeFailure"}
    stored = await patch_status(
        api, GPU_LEASES, intent.name, closing, field_manager="jobtree-binder"
    )
    record = lease_record(stored)
    assert (record.open, record.end, record.closure) == (False, end, "NodeFailure")
    with pytest.raises(KubeError) as reopen:
        await patch_status(
            api, GPU_LEASES, intent.name, {"closed": False}, field_manager="jobtree-binder"
        )
    assert reopen.value.status == 422
    with pytest.raises(KubeError) as respec:
        changed = labelled(lease_manifest(intent, run_uid="u-1", gen=0))
        changed["spec"]["slice"]["gpus"] = 8
        await apply(api, GPU_LEASES, changed, field_manager="jobtree-binder")
    assert respec.value.status == 422 and "immutable" in respec.value.message


# ---------------------------------------------------------------------------- pods


def pod_intent(run: str, rank: int = 0) -> PodIntent:
    return PodIntent(
        name=f"{run}-g0-r{rank}",
        run=(NS, run),
        node=NODE,
        gpus=4,
        group=0,
        rank=rank,
        role=Role.ACTIVE,
        world_size=2,
        master=f"{run}-g0-r0",
    )


@session_loop
@pytest.mark.parametrize("with_template", [True, False])
async def test_pods_bind_to_a_kwok_node_and_run(api: ApiClient, with_template: bool) -> None:
    name = "pods-template" if with_template else "pods-hold"
    template = {
        "metadata": {"labels": {"app": "trainer"}},
        "spec": {"containers": [{"name": "main", "image": "example.com/trainer:1"}]},
    }
    run = await create(api, RUNS, run_obj(name, template=template if with_template else None))
    svc = await apply(api, SERVICES, headless_service(run), field_manager="jobtree-binder")
    assert svc["spec"]["clusterIP"] == "None"
    for rank in (0, 1):
        manifest = pod_manifest(pod_intent(name, rank), run, service_name=service_name(name))
        await create(api, PODS, manifest)
    pod = await eventually_get(
        api, PODS, f"{name}-g0-r1", NS, lambda p: p.get("status", {}).get("phase") == "Running"
    )
    assert pod["spec"]["nodeName"] == NODE
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert pod["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == f"{name}-g0-r0.{name}.{NS}.svc" and env["RANK"] == "1"
