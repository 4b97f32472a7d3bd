"""The packer over a real nats-server and a real kube-apiserver with KWOK nodes.

PLAN requests go over NATS as admission sends them; node failures are produced for real (a
deleted node, a node whose Ready condition turns False) and the NODE_FAILED events are read off
the bus.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.packer.service import Packer, PackerOptions
from shared.bus import (
    NODE_FAILED,
    PLAN,
    NodeFailed,
    PlanReply,
    PlanRequest,
    RunRef,
    ServiceRuntime,
    decode,
)
from shared.engine.model import Envelope, Role, RunRequest
from shared.engine.state import Settings
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

FLAVOR = "H100-80GB"
LABELS = {"region": "pack-r", "cluster": "pack-c", "fabric.domain": "pack-f", "gpu.flavor": FLAVOR}
OWNER = "org:packtest"
ENVELOPE = Envelope(
    budget="pk-budget",
    owner=OWNER,
    name="main",
    flavor=FLAVOR,
    selector={"region": "pack-r"},
    concurrency=1000,
)
GRACE = 1.0


def request(
    name: str,
    gpus: int,
    *,
    group: int | None = 8,
    region: str = "pack-r",
    opportunistic: bool = False,
) -> RunRequest:
    return h.engine_run(
        "pk", name, gpus, owner=OWNER, region=region, group=group, opportunistic=opportunistic
    )


def planning(run: RunRequest, own_claim: str | None = None) -> PlanRequest:
    return h.plan_request(run, ENVELOPE, own_claim)


def hold(
    kube: ControlPlane,
    name: str,
    node: str,
    gpus: int = 8,
    *,
    role: Role = Role.ACTIVE,
    run: str = "holder",
) -> None:
    """An open Lease of another run on ``node`` (as the binder would have written it)."""
    h.hold_lease(
        kube,
        name,
        node,
        run=RunRef(namespace="pk", name=run, uid=f"uid-{run}", generation=1),
        owner=OWNER,
        envelope="pk-budget/main",
        gpus=gpus,
        role=role,
        comp_path=("h.GROUP[0]", "RANK[0]"),
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane) -> list[str]:
    return h.add_nodes(crds, "pack", 4, **LABELS)


@pytest_asyncio.fixture(scope="module")
async def packer(
    crds: ControlPlane, nats_server: NatsServer, fleet: list[str]
) -> AsyncIterator[Packer]:
    runtime = ServiceRuntime(
        "packer", nats_url=nats_server.url, credentials=nats_server.credentials("packer")
    )
    options = PackerOptions(settings=Settings(node_grace=timedelta(seconds=GRACE)))
    async with h.in_process(crds, lambda api: Packer(runtime, api, options)) as service:
        yield service


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, packer: Packer) -> AsyncIterator[ServiceRuntime]:
    async with h.bus_client(nats_server, "packer-test-client") as runtime:
        yield runtime


@pytest_asyncio.fixture(scope="module")
async def failures(client: ServiceRuntime) -> AsyncIterator[list[tuple[float, NodeFailed]]]:
    """(monotonic arrival time, event) of every NODE_FAILED published while the module runs."""

    def record(msg: Any) -> tuple[float, NodeFailed]:
        return time.monotonic(), decode(msg.data, NodeFailed)

    async with h.collected(client, NODE_FAILED.name, record) as seen:
        yield seen


async def ask(client: ServiceRuntime, req: PlanRequest) -> PlanReply:
    return await client.request(PLAN, req, timeout=10)


# --------------------------------------------------------------------------- PLAN


async def test_plan_places_a_gang_on_the_kwok_fleet(
    fleet: list[str], packer: Packer, client: ServiceRuntime
) -> None:
    reply = await ask(client, planning(request("a", 16)))
    assert reply.fits, reply.message
    assert reply.placement is not None
    assert reply.placement.active_gpus == 16
    assert {s.node for s in reply.placement.slices} <= set(fleet)
    assert {s.envelope for s in reply.placement.slices} == {"pk-budget/main"}
    assert [g.domain for g in reply.placement.groups] == [("pack-r", "pack-c", "pack-f")] * 2
    assert 0 < reply.version <= packer.cache.version


async def test_plan_says_why_nothing_fits(client: ServiceRuntime) -> None:
    before = h.sample("jobtree_packer_plans_total", result="NoCapacity")
    reply = await ask(client, planning(request("big", 64)))
    assert not reply.fits
    assert reply.reason == "NoCapacity"
    assert reply.message
    assert h.sample("jobtree_packer_plans_total", result="NoCapacity") == before + 1


async def test_plan_counts_open_leases_and_protects_reservations(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    hold(crds, "pk-hold-1", fleet[0])

    async def only_24_free() -> None:
        assert not (await ask(client, planning(request("c", 32)))).fits

    deadline = time.monotonic() + 10
    while (await ask(client, planning(request("c", 32)))).fits:
        assert time.monotonic() < deadline, "the packer never saw the lease"
        await asyncio.sleep(0.1)
    await only_24_free()
    reply = await ask(client, planning(request("c", 24)))
    assert reply.placement is not None
    assert fleet[0] not in {s.node for s in reply.placement.slices}

    h.apply(
        crds,
        h.reservation_manifest(
            namespace,
            "pk-resv",
            run="someone-else",
            labels=LABELS,
            nodes=[fleet[1]],
            gpus=8,
        ),
    )
    deadline = time.monotonic() + 10
    while (await ask(client, planning(request("c", 24)))).fits:
        assert time.monotonic() < deadline, "the packer never saw the reservation"
        await asyncio.sleep(0.1)
    # The reservation's own activation may use the promised GPUs.
    assert (await ask(client, planning(request("c", 24), own_claim="pk-resv"))).fits
    crds.kubectl("delete", f"reservations.{h.GROUP}", "-n", namespace, "pk-resv")


async def test_an_opportunistic_run_is_planned_into_spares_before_free_gpus(
    crds: ControlPlane, client: ServiceRuntime
) -> None:
    spare_node, free_node = h.add_nodes(crds, "pack-fill", 2, **{**LABELS, "region": "fill-r"})
    hold(crds, "pk-fill-spare", spare_node, role=Role.SPARE)
    sweep = request("sweep", 8, region="fill-r", opportunistic=True)
    before = h.sample("jobtree_packer_plans_total", result="fill")

    async def placed(run: RunRequest, role: Role, node: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            reply = await ask(client, planning(run))
            assert reply.placement is not None, reply.message
            got = [(s.node, s.role, s.rank) for s in reply.placement.slices]
            if got == [(node, role, 0)]:
                return
            assert time.monotonic() < deadline, f"{run.key[1]} placed {got}"
            await asyncio.sleep(0.1)

    # The spare's GPUs are the fill's ranks; the free node stays for ordinary Runs.
    await placed(sweep, Role.BORROWED, spare_node)
    assert h.sample("jobtree_packer_plans_total", result="fill") >= before + 1
    await placed(request("plain", 8, region="fill-r"), Role.ACTIVE, free_node)
    # Once the spare is filled, the next opportunistic Run falls back to free GPUs.
    hold(crds, "pk-fill-sweep", spare_node, role=Role.BORROWED, run="sweep")
    await placed(request("sweep-2", 8, region="fill-r", opportunistic=True), Role.ACTIVE, free_node)


# --------------------------------------------------------------------------- node health


async def test_a_deleted_node_under_a_lease_is_announced_once(
    crds: ControlPlane, fleet: list[str], failures: list[tuple[float, NodeFailed]]
) -> None:
    before = h.sample("jobtree_node_failures_total", reason="NodeDeleted")
    crds.kubectl("delete", "node", fleet[0], "--wait=false")

    def announced() -> None:
        assert [e.node for _, e in failures if e.reason == "NodeDeleted"] == [fleet[0]]

    await h.eventually(announced, interval=0.1, in_thread=False)
    await asyncio.sleep(2 * GRACE)  # several health passes later: still only once
    announced()
    assert h.sample("jobtree_node_failures_total", reason="NodeDeleted") == before + 1


async def test_a_not_ready_node_under_a_lease_is_announced_after_the_grace(
    crds: ControlPlane, fleet: list[str], failures: list[tuple[float, NodeFailed]]
) -> None:
    node = fleet[2]
    hold(crds, "pk-hold-3", node)
    await asyncio.sleep(0.5)
    # Take the node away from KWOK (or its heartbeats would mark it Ready again), then fail it.
    crds.kubectl("annotate", "node", node, "kwok.x-k8s.io/node-")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "KubeletStopped",
                    "message": "test",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ]
        }
    }
    patched = time.monotonic()
    crds.kubectl(
        "patch", "node", node, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )

    def announced() -> NodeFailed:
        events = [(at, e) for at, e in failures if e.node == node]
        assert [e.reason for _, e in events] == ["NotReady"]
        assert events[0][0] - patched >= GRACE - 1.0  # transition time has 1 s resolution
        return events[0][1]

    event = await h.eventually(announced, interval=0.1, in_thread=False)
    assert event.at.replace(microsecond=0) == datetime.fromisoformat(now.replace("Z", "+00:00"))


async def test_cordon_is_not_a_failure(
    crds: ControlPlane, fleet: list[str], failures: list[tuple[float, NodeFailed]]
) -> None:
    node = fleet[3]
    hold(crds, "pk-hold-4", node)
    crds.kubectl("cordon", node)
    await asyncio.sleep(2 * GRACE)
    assert node not in {e.node for _, e in failures}
    crds.kubectl("uncordon", node)


async def test_nodes_missing_labels_are_counted_not_fatal(
    crds: ControlPlane, packer: Packer, client: ServiceRuntime
) -> None:
    before = packer.cache.missing_label_nodes
    labels = {k: v for k, v in LABELS.items() if k != "fabric.domain"}
    h.add_nodes(crds, "pack-nolabel", 1, **labels)

    def counted() -> None:
        assert h.sample("jobtree_nodes_missing_labels") == before + 1

    await h.eventually(counted, interval=0.1, in_thread=False)
    assert (await ask(client, planning(request("d", 8)))).fits  # still serving


# --------------------------------------------------------------------------- the process


async def test_the_packer_process_gets_ready_and_exits_cleanly_on_sigterm(
    crds: ControlPlane, nats_server: NatsServer, tmp_path: Path
) -> None:
    service = "packer"
    log = tmp_path / f"{service}.log"
    proc, port = h.spawn_service(service, crds, nats_server, log)
    try:
        await h.wait_ready(proc, port, log)
        code, metrics = h.http_get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert f'jobtree_service_info{{service="{service}"' in metrics
        code = await h.terminate(proc)
        assert code == 0, log.read_text()
    finally:
        h.kill(proc)
