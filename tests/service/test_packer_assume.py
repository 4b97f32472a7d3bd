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
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from services.packer.service import Packer, PackerOptions
from shared.bus import PLAN, PlanReply, PlanRequest, RunRef, ServiceRuntime
from shared.engine.bindplan import LeaseIntent
from shared.engine.model import Envelope, FundingKind, LeaseReason, Role, RunRequest
from shared.engine.offers import Funding, Offer
from shared.kube.client import make_client
from shared.kube.translate import lease_manifest
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from .conftest import add_nodes

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


def plan_request(name: str, gpus: int = 16) -> PlanRequest:
    run = RunRequest(
        key=("asm", name),
        uid=f"uid-{name}",
        owner=OWNER,
        flavor=FLAVOR,
        total_gpus=gpus,
        group_gpus=8,
        selector={"region": "asm-r"},
    )
    funding = Funding(offers=(Offer(ENVELOPE, gpus, FundingKind.OWNED),))
    return PlanRequest(
        run=RunRef(namespace="asm", name=name, uid=run.uid, generation=1),
        request=run,
        funding=funding,
    )


def nodes_of(reply: PlanReply) -> set[str]:
    assert reply.placement is not None, reply
    return {s.node for g in reply.placement.groups for s in g.slices}


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane) -> list[str]:
    return add_nodes(crds, "asm", 4, **LABELS)


@pytest_asyncio.fixture(scope="module")
async def packer(
    crds: ControlPlane, nats_server: NatsServer, fleet: list[str]
) -> AsyncIterator[Packer]:
    api = await make_client(str(crds.kubeconfig))
    service = Packer(
        ServiceRuntime("packer", nats_url=nats_server.url),
        api,
        PackerOptions(assume_seconds=ASSUME),
    )
    await asyncio.wait_for(service.start(), 60)
    deadline = time.monotonic() + 30
    while not set(fleet) <= {n.name for n in service.cache.topology}:
        assert time.monotonic() < deadline, "the packer never saw the fleet"
        await asyncio.sleep(0.1)
    try:
        yield service
    finally:
        await service.stop()
        await api.close()


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, packer: Packer) -> AsyncIterator[ServiceRuntime]:
    runtime = ServiceRuntime("packer-assume-client", nats_url=nats_server.url)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def ask(client: ServiceRuntime, name: str, gpus: int = 16) -> PlanReply:
    return await client.request(PLAN, plan_request(name, gpus), timeout=10)


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
        intent = LeaseIntent(
            name=f"asm-committed-{rank}",
            run=("asm", "committed"),
            owner=OWNER,
            node=node,
            gpus=8,
            role=Role.ACTIVE,
            group=0,
            rank=rank,
            envelope="asm-budget/main",
            payer_owner=OWNER,
            funding=FundingKind.OWNED,
            start=datetime.now(UTC),
            reason=LeaseReason.START,
            expected_end=None,
            comp_path=("GROUP[0]", f"RANK[{rank}]"),
        )
        body = lease_manifest(intent, run_uid="uid-committed", gen=1)
        crds.kubectl("apply", "-f", "-", input=json.dumps(body))
    deadline = time.monotonic() + 20
    while {le.node for le in packer.cache.leases_of(("asm", "committed"))} != held:
        assert time.monotonic() < deadline, "the packer never saw the committed Leases"
        await asyncio.sleep(0.1)
    await ask(client, "probe", 8)
    assert ("asm", "committed") not in packer.assumed, "a committed placement is still assumed"
    # "other" was never committed: after assume_seconds its nodes are offered again.
    await asyncio.sleep(ASSUME + 0.5)
    assert nodes_of(await ask(client, "late")) == set(fleet[2:])
