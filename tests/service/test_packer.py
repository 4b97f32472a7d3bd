"""The packer over a real nats-server and a real kube-apiserver with KWOK nodes.

PLAN requests go over NATS as admission sends them; node failures are produced for real (a
deleted node, a node whose Ready condition turns False) and the NODE_FAILED events are read off
the bus.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

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
from shared.engine.bindplan import LeaseIntent
from shared.engine.model import Envelope, FundingKind, LeaseReason, Role, RunRequest
from shared.engine.offers import Funding, Offer
from shared.kube.client import make_client
from shared.kube.translate import lease_manifest
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer
from shared.localenv.processes import free_port

from .conftest import add_nodes

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[2]
GROUP = "rq.davidlangworthy.io"
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


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def request(
    name: str,
    gpus: int,
    *,
    group: int | None = 8,
    region: str = "pack-r",
    opportunistic: bool = False,
) -> RunRequest:
    return RunRequest(
        key=("pk", name),
        uid=f"uid-{name}",
        owner=OWNER,
        flavor=FLAVOR,
        total_gpus=gpus,
        group_gpus=group,
        selector={"region": region},
        opportunistic=opportunistic,
    )


def plan_request(run: RunRequest, own_claim: str | None = None) -> PlanRequest:
    envelope = replace(ENVELOPE, selector=dict(run.selector))
    funding = Funding(offers=(Offer(envelope, run.total_gpus, FundingKind.OWNED),))
    return PlanRequest(
        run=RunRef(namespace=run.key[0], name=run.key[1], uid=run.uid, generation=1),
        request=run,
        funding=funding,
        own_claim=own_claim,
    )


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
    intent = LeaseIntent(
        name=name,
        run=("pk", run),
        owner=OWNER,
        node=node,
        gpus=gpus,
        role=role,
        group=0,
        rank=-1 if role is Role.SPARE else 0,
        envelope="pk-budget/main",
        payer_owner=OWNER,
        funding=FundingKind.OWNED,
        start=datetime.now(UTC),
        reason=LeaseReason.START,
        expected_end=None,
        comp_path=("GROUP[0]", "RANK[0]"),
    )
    body = lease_manifest(intent, run_uid=f"uid-{run}", gen=1)
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane) -> list[str]:
    return add_nodes(crds, "pack", 4, **LABELS)


@pytest_asyncio.fixture(scope="module")
async def packer(
    crds: ControlPlane, nats_server: NatsServer, fleet: list[str]
) -> AsyncIterator[Packer]:
    api = await make_client(str(crds.kubeconfig))
    runtime = ServiceRuntime("packer", nats_url=nats_server.url)
    service = Packer(runtime, api, PackerOptions(node_grace=timedelta(seconds=GRACE)))
    await asyncio.wait_for(service.start(), 60)
    try:
        yield service
    finally:
        await service.stop()
        await api.close()


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, packer: Packer) -> AsyncIterator[ServiceRuntime]:
    runtime = ServiceRuntime("packer-test-client", nats_url=nats_server.url)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest_asyncio.fixture(scope="module")
async def failures(client: ServiceRuntime) -> AsyncIterator[list[tuple[float, NodeFailed]]]:
    """(monotonic arrival time, event) of every NODE_FAILED published while the module runs."""
    seen: list[tuple[float, NodeFailed]] = []

    async def on_msg(msg: Any) -> None:
        seen.append((time.monotonic(), decode(msg.data, NodeFailed)))

    sub = await client.nc.subscribe(NODE_FAILED.name, cb=on_msg)
    try:
        yield seen
    finally:
        await sub.unsubscribe()


async def ask(client: ServiceRuntime, req: PlanRequest) -> PlanReply:
    return await client.request(PLAN, req, timeout=10)


# --------------------------------------------------------------------------- PLAN


async def test_plan_places_a_gang_on_the_kwok_fleet(
    fleet: list[str], packer: Packer, client: ServiceRuntime
) -> None:
    reply = await ask(client, plan_request(request("a", 16)))
    assert reply.fits, reply.message
    assert reply.placement is not None
    assert reply.placement.active_gpus == 16
    assert {s.node for s in reply.placement.slices} <= set(fleet)
    assert {s.envelope for s in reply.placement.slices} == {"pk-budget/main"}
    assert [g.domain for g in reply.placement.groups] == [("pack-r", "pack-c", "pack-f")] * 2
    assert 0 < reply.version <= packer.cache.version


async def test_plan_says_why_nothing_fits(client: ServiceRuntime) -> None:
    before = sample("jobtree_packer_plans_total", result="NoCapacity")
    reply = await ask(client, plan_request(request("big", 64)))
    assert not reply.fits
    assert reply.reason == "NoCapacity"
    assert reply.message
    assert sample("jobtree_packer_plans_total", result="NoCapacity") == before + 1


async def test_plan_counts_open_leases_and_protects_reservations(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    hold(crds, "pk-hold-1", fleet[0])

    async def only_24_free() -> None:
        assert not (await ask(client, plan_request(request("c", 32)))).fits

    deadline = time.monotonic() + 10
    while (await ask(client, plan_request(request("c", 32)))).fits:
        assert time.monotonic() < deadline, "the packer never saw the lease"
        await asyncio.sleep(0.1)
    await only_24_free()
    reply = await ask(client, plan_request(request("c", 24)))
    assert reply.placement is not None
    assert fleet[0] not in {s.node for s in reply.placement.slices}

    crds.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": f"{GROUP}/v1",
                "kind": "Reservation",
                "metadata": {
                    "name": "pk-resv",
                    "namespace": namespace,
                    "annotations": {f"{GROUP}/gpus": "8"},
                },
                "spec": {
                    "runRef": {"name": "someone-else"},
                    "intendedSlice": {
                        "domain": {k: LABELS[k] for k in ("region", "cluster", "fabric.domain")},
                        "nodes": [fleet[1]],
                    },
                    "earliestStart": "2099-01-01T00:00:00Z",
                },
            }
        ),
    )
    deadline = time.monotonic() + 10
    while (await ask(client, plan_request(request("c", 24)))).fits:
        assert time.monotonic() < deadline, "the packer never saw the reservation"
        await asyncio.sleep(0.1)
    # The reservation's own activation may use the promised GPUs.
    assert (await ask(client, plan_request(request("c", 24), own_claim="pk-resv"))).fits
    crds.kubectl("delete", f"reservations.{GROUP}", "-n", namespace, "pk-resv")


async def test_an_opportunistic_run_is_planned_into_spares_before_free_gpus(
    crds: ControlPlane, client: ServiceRuntime
) -> None:
    spare_node, free_node = add_nodes(crds, "pack-fill", 2, **{**LABELS, "region": "fill-r"})
    hold(crds, "pk-fill-spare", spare_node, role=Role.SPARE)
    sweep = request("sweep", 8, region="fill-r", opportunistic=True)
    before = sample("jobtree_packer_plans_total", result="fill")

    async def placed(run: RunRequest, role: Role, node: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            reply = await ask(client, plan_request(run))
            assert reply.placement is not None, reply.message
            got = [(s.node, s.role, s.rank) for s in reply.placement.slices]
            if got == [(node, role, 0)]:
                return
            assert time.monotonic() < deadline, f"{run.key[1]} placed {got}"
            await asyncio.sleep(0.1)

    # The spare's GPUs are the fill's ranks; the free node stays for ordinary Runs.
    await placed(sweep, Role.BORROWED, spare_node)
    assert sample("jobtree_packer_plans_total", result="fill") >= before + 1
    await placed(request("plain", 8, region="fill-r"), Role.ACTIVE, free_node)
    # Once the spare is filled, the next opportunistic Run falls back to free GPUs.
    hold(crds, "pk-fill-sweep", spare_node, role=Role.BORROWED, run="sweep")
    await placed(request("sweep-2", 8, region="fill-r", opportunistic=True), Role.ACTIVE, free_node)


# --------------------------------------------------------------------------- node health


async def test_a_deleted_node_under_a_lease_is_announced_once(
    crds: ControlPlane, fleet: list[str], failures: list[tuple[float, NodeFailed]]
) -> None:
    before = sample("jobtree_node_failures_total", reason="NodeDeleted")
    crds.kubectl("delete", "node", fleet[0], "--wait=false")

    def announced() -> None:
        assert [e.node for _, e in failures if e.reason == "NodeDeleted"] == [fleet[0]]

    await eventually(announced)
    await asyncio.sleep(2 * GRACE)  # several health passes later: still only once
    announced()
    assert sample("jobtree_node_failures_total", reason="NodeDeleted") == before + 1


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

    event = await eventually(announced)
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
    add_nodes(crds, "pack-nolabel", 1, **labels)

    def counted() -> None:
        assert sample("jobtree_nodes_missing_labels") == before + 1

    await eventually(counted)
    assert (await ask(client, plan_request(request("d", 8)))).fits  # still serving


# --------------------------------------------------------------------------- the process


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


async def test_the_packer_process_gets_ready_and_exits_cleanly_on_sigterm(
    crds: ControlPlane, nats_server: NatsServer, tmp_path: Path
) -> None:
    service = "packer"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp_path / f"{service}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"services.{service}",
                f"--nats-url={nats_server.url}",
                f"--kubeconfig={crds.kubeconfig}",
                f"--http-port={port}",
                "--log-format=text",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:

        def ready() -> None:
            assert proc.poll() is None, log.read_text()
            try:
                assert _get(f"http://127.0.0.1:{port}/readyz") == 200
            except OSError as exc:
                raise AssertionError(str(exc)) from exc

        await eventually(ready, timeout=30, interval=0.2)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        assert f'jobtree_service_info{{service="{service}"'.encode() in metrics
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
