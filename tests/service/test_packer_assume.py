"""The packer keeps placements it handed out from other plans until they are committed.

Admission runs several workers, and the resolver plans too: PLAN requests for different Runs
arrive back to back, before the binder has committed (and the packer's watch has seen) the
Leases of the first. Pack is deterministic, so without memory of what it just handed out the
packer gives every one of them the same emptiest nodes and all but one commit is rejected by the
binder (``NodeCapacity``), each costing the proposer a retry or a back-off. Real packer, real
nats-server, real kube-apiserver with KWOK nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.packer.service import Packer, PackerOptions
from shared.bus import PLAN, PlanReply, RunRef, ServiceRuntime
from shared.engine.model import Envelope
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

FLAVOR = "H100-80GB"
OWNER = "org:assumetest"
LABELS = {"region": "asm-r", "cluster": "asm-c", "fabric.domain": "asm-f", "gpu.flavor": FLAVOR}
ENVELOPE = Envelope(
    budget="asm-budget",
    owner=OWNER,
    name="main",
    flavor=FLAVOR,
    selector={"region": "asm-r"},
    concurrency=1000,
)
ASSUME = 3.0


def nodes_of(reply: PlanReply) -> set[str]:
    assert reply.placement is not None, reply
    return {s.node for g in reply.placement.groups for s in g.slices}


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane) -> list[str]:
    return h.add_nodes(crds, "asm", 4, **LABELS)


@pytest_asyncio.fixture(scope="module")
async def packer(
    crds: ControlPlane, nats_server: NatsServer, fleet: list[str]
) -> AsyncIterator[Packer]:
    runtime = ServiceRuntime(
        "packer", nats_url=nats_server.url, credentials=nats_server.credentials("packer")
    )
    options = PackerOptions(assume_seconds=ASSUME)
    async with h.in_process(crds, lambda api: Packer(runtime, api, options)) as service:

        def sees_fleet() -> None:
            topology = {n.name for n in service.cache.topology}
            assert set(fleet) <= topology, "the packer never saw the fleet"

        await h.eventually(sees_fleet, timeout=30, interval=0.1, in_thread=False)
        yield service


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, packer: Packer) -> AsyncIterator[ServiceRuntime]:
    async with h.bus_client(nats_server, "packer-assume-client") as runtime:
        yield runtime


async def ask(client: ServiceRuntime, name: str, gpus: int = 16) -> PlanReply:
    run = h.engine_run("asm", name, gpus, owner=OWNER, region="asm-r")
    return await client.request(PLAN, h.plan_request(run, ENVELOPE), timeout=10)


async def test_back_to_back_plans_get_different_nodes(
    fleet: list[str], packer: Packer, client: ServiceRuntime
) -> None:
    first = nodes_of(await ask(client, "first"))
    second = nodes_of(await ask(client, "second"))
    assert first == set(fleet[:2]), first  # pack-to-empty, by name
    assert second == set(fleet[2:]), f"both plans got {first & second}"
    # An assumption is a guess, never a NoFit: with every node assumed, a third Run still gets
    # a placement (the binder's re-check decides who wins).
    third = await ask(client, "third")
    assert third.placement is not None, third
    # A Run's own earlier placement never blocks its re-plan.
    assert nodes_of(await ask(client, "first")) == first


async def test_an_assumption_ends_when_its_leases_show_up_or_it_expires(
    crds: ControlPlane, fleet: list[str], packer: Packer, client: ServiceRuntime
) -> None:
    await asyncio.sleep(ASSUME + 0.5)  # the first test's assumptions expire
    held = nodes_of(await ask(client, "committed"))
    assert held == set(fleet[:2])
    assert nodes_of(await ask(client, "other")) == set(fleet[2:])
    # The binder commits "committed": its Leases reach the packer's cache.
    for rank, node in enumerate(sorted(held)):
        h.hold_lease(
            crds,
            f"asm-committed-{rank}",
            node,
            run=RunRef(namespace="asm", name="committed", uid="uid-committed", generation=1),
            owner=OWNER,
            envelope="asm-budget/main",
            rank=rank,
        )

    def sees_leases() -> None:
        nodes = {le.node for le in packer.cache.leases_of(("asm", "committed"))}
        assert nodes == held, "the packer never saw the committed Leases"

    await h.eventually(sees_leases, interval=0.1, in_thread=False)
    await ask(client, "probe", 8)
    assert ("asm", "committed") not in packer.assumed, "a committed placement is still assumed"
    # "other" was never committed: after assume_seconds its nodes are offered again.
    await asyncio.sleep(ASSUME + 0.5)
    assert nodes_of(await ask(client, "late")) == set(fleet[2:])
