"""The resolver over a real nats-server and a real kube-apiserver with KWOK nodes.

The resolver and the REAL binder run in-process; ``ACTIVATE`` and ``NODE_FAILED`` are sent over
NATS as the forecaster and the packer send them, leases are created with kubectl from
``shared.kube.translate.lease_manifest``, and every effect is read back from the API server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.resolver.service import Resolver
from shared.api import Reservation, parse_object
from shared.bus import (
    ACTIVATE,
    NODE_FAILED,
    ActivateReply,
    ActivateRequest,
    NodeFailed,
    RunRef,
    ServiceRuntime,
)
from shared.bus.logs import JsonFormatter
from shared.engine.lottery import Token, lottery_seed, replay, verify
from shared.engine.model import Role
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

REGION = "rs-r"
LABELS = {"region": REGION, "cluster": "rs-c", "fabric.domain": "rs-f"}
DOMAIN = {"region": REGION, "cluster": "rs-c", "fabric.domain": "rs-f"}
SCOPE = f"{h.FLAVOR}@{REGION}/*/*"


# --------------------------------------------------------------------------- helpers


def make_run(
    kube: ControlPlane, namespace: str, name: str, owner: str, gpus: int, **spec: Any
) -> dict[str, Any]:
    """A Run of ``owner`` in this module's region, 3h long unless ``runtime`` says."""
    return h.create_run(
        kube, namespace, name, owner, gpus, region=REGION, max_duration="3h", **spec
    )


def hold(
    kube: ControlPlane,
    run_obj: dict[str, Any],
    node: str,
    *,
    group: int = 0,
    rank: int = 0,
    role: Role = Role.ACTIVE,
    expected_end: datetime | None = None,
) -> str:
    """A Lease of 8 GPUs on ``node`` for the Run, created with kubectl; returns its name."""
    owner = run_obj["spec"]["owner"]
    tag = "s" if role is Role.SPARE else "r"
    start = datetime.now(UTC) - timedelta(minutes=10)
    return h.hold_lease(
        kube,
        f"{run_obj['metadata']['name']}-g{group}-{tag}{max(rank, 0)}",
        node,
        run=RunRef.of(run_obj),
        owner=owner,
        envelope=f"{owner.replace(':', '-')}/main",
        role=role,
        group=group,
        rank=rank,
        start=start,
        expected_end=expected_end or start + timedelta(hours=3),
    )


def admin_reservation(
    kube: ControlPlane, namespace: str, name: str, run: str, nodes: list[str]
) -> dict[str, Any]:
    """An administrator's Reservation (no status, no forecaster labels) due already."""
    h.apply(
        kube,
        h.reservation_manifest(
            namespace,
            name,
            run=run,
            labels=DOMAIN,
            nodes=nodes,
            earliest_start="2025-01-06T09:00:00Z",
        ),
    )
    obj: dict[str, Any] = h.get_json(kube, h.RESERVATIONS, "-n", namespace, name)
    return obj


def lease(kube: ControlPlane, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = h.get_json(kube, h.LEASES, name)
    return obj


def open_leases_of(kube: ControlPlane, namespace: str, run: str) -> list[dict[str, Any]]:
    items = h.lease_items(kube, namespace, run)
    return [x for x in items if not (x.get("status") or {}).get("closed")]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane, namespace: str) -> list[str]:
    """Six 8-GPU KWOK nodes in their own region and budgets for three owners."""
    budgets = [
        h.budget_manifest(owner.replace(":", "-"), owner, REGION, 64)
        for owner in ("org:rstest:big", "org:rstest:lab", "org:rstest:ops")
    ]
    return h.fleet_with_budgets(crds, namespace, "rs", 6, LABELS, *budgets, owners="org:rstest:*")


@pytest_asyncio.fixture(scope="module")
async def services(
    crds: ControlPlane, nats_server: NatsServer, fleet: list[str], namespace: str
) -> AsyncIterator[Resolver]:
    """The real binder and the resolver, in-process."""
    async with h.kube_api(crds) as api:
        binder, resolver = h.binder_and_resolver(api, nats_server, namespace)
        async with h.started(binder, resolver):
            yield resolver


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, services: Resolver) -> AsyncIterator[ServiceRuntime]:
    async with h.bus_client(nats_server, "resolver-test-client") as runtime:
        yield runtime


async def activate(client: ServiceRuntime, resv: dict[str, Any]) -> ActivateReply:
    """ACTIVATE names the Reservation only: the instant comes from the Reservation itself."""
    meta = resv["metadata"]
    req = ActivateRequest(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
    return await client.request(ACTIVATE, req, timeout=60)


DUE = datetime(2025, 1, 6, 9, tzinfo=UTC)
"""``earliestStart`` of the administrator Reservations here: with no ``activatedAt`` published
by a forecaster, the resolver records this instant as the activation time (it seeds the lottery)."""


# --------------------------------------------------------------------------- tests


async def test_activation_binds_when_the_run_fits_on_its_slice(
    crds: ControlPlane, namespace: str, client: ServiceRuntime
) -> None:
    make_run(crds, namespace, "fits", "org:rstest:ops", 8)
    resv = admin_reservation(crds, namespace, "fits-resv", "fits", ["rs-04"])
    reply = await activate(client, resv)
    assert reply.released and reply.seed is None, reply

    def released() -> dict[str, Any]:
        obj: dict[str, Any] = h.get_json(crds, h.RESERVATIONS, "-n", namespace, "fits-resv")
        status = obj.get("status") or {}
        assert status.get("state") == "Released", status
        return obj

    obj = await h.eventually(released)
    assert obj["status"]["reason"] == "Bound" and obj["status"]["releasedAt"]
    assert "audit" not in obj["status"]
    (held,) = await h.eventually(lambda: _one(open_leases_of(crds, namespace, "fits")))
    assert held["spec"]["slice"]["nodes"] == ["rs-04"]
    pod = h.get_json(crds, "pods", "-n", namespace, "fits-g0-r0")
    assert pod["spec"]["nodeName"] == "rs-04"
    # Idempotent: a re-sent ACTIVATE answers from the Reservation and commits nothing new.
    again = await activate(client, resv)
    assert again.released and again.message == "already released"
    assert len(open_leases_of(crds, namespace, "fits")) == 1


def _one(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert len(items) == 1, [x["metadata"]["name"] for x in items]
    return items


async def test_activation_shrinks_then_draws_the_lottery_and_publishes_the_audit(
    crds: ControlPlane,
    namespace: str,
    client: ServiceRuntime,
    services: Resolver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    elastic = make_run(
        crds,
        namespace,
        "elastic",
        "org:rstest:lab",
        16,
        locality={"groupGPUs": 8},
        malleable={"minTotalGPUs": 8, "maxTotalGPUs": 16, "stepGPUs": 8},
    )
    fixed = make_run(crds, namespace, "fixed", "org:rstest:ops", 8)
    shrunk = hold(crds, elastic, "rs-01", group=0, rank=0)
    kept = hold(crds, elastic, "rs-03", group=1, rank=1)
    drawn = hold(crds, fixed, "rs-02")
    make_run(crds, namespace, "big", "org:rstest:big", 16, locality={"groupGPUs": 8})
    resv = admin_reservation(crds, namespace, "big-resv", "big", ["rs-01", "rs-02"])
    await cached(services, shrunk, kept, drawn)
    draws_before = h.sample("jobtree_lottery_draws_total")
    caplog.set_level(logging.INFO, logger="services.resolver.service")

    reply = await activate(client, resv)

    seed = lottery_seed(SCOPE, resv["metadata"]["uid"], DUE)
    assert reply.released and reply.seed == seed, reply
    assert lease(crds, shrunk)["status"]["closureReason"] == "Shrink"
    assert lease(crds, drawn)["status"]["closureReason"] == f"RandomPreempt({seed})"
    assert not (lease(crds, kept).get("status") or {}).get("closed")
    nodes = await h.eventually(lambda: _nodes(open_leases_of(crds, namespace, "big"), 2))
    assert nodes == {"rs-01", "rs-02"}
    # The audit: seed, conflict set, draws and ended leases, enough to replay the draw.
    obj = h.get_json(crds, h.RESERVATIONS, "-n", namespace, "big-resv")
    resv_model = parse_object(obj)
    assert isinstance(resv_model, Reservation) and resv_model.status is not None
    assert resv_model.status.state is not None and resv_model.status.state.value == "Released"
    audit = resv_model.status.audit
    assert audit is not None and audit.seed == seed
    assert audit.conflict_set == [f"{namespace}/fixed"]
    assert [(d.step, d.run) for d in audit.draws or []] == [(0, f"{namespace}/fixed")]
    assert set(audit.ended_leases or []) == {shrunk, drawn}
    tokens = [
        Token(
            t.owner,
            (t.run.split("/")[0], t.run.split("/")[1]),
            t.group,
            t.gpus,
            tuple(t.leases or ()),
            t.width,
            t.run_slack,
        )
        for t in audit.tokens or []
    ]
    replayed = replay(seed, tokens, audit.deficit_gpus or 0)
    assert [(d.step, d.token.run) for d in replayed] == [(0, (namespace, "fixed"))]
    assert verify(seed, tokens, audit.deficit_gpus or 0, replayed)
    # One grep-able JSON log line with RandomPreempt(<seed>), the seed and the conflict set.
    lines = [r for r in caplog.records if "RandomPreempt(" in r.getMessage()]
    assert len(lines) == 1
    doc = json.loads(JsonFormatter("resolver").format(lines[0]))
    assert f"lottery=RandomPreempt({seed})" in doc["msg"]
    assert doc["seed"] == seed and doc["conflictSet"] == [f"{namespace}/fixed"]
    assert h.sample("jobtree_lottery_draws_total") == draws_before + 1
    assert h.sample("jobtree_resolver_actions_total", kind="Shrink") >= 1
    assert h.sample("jobtree_preemptions_total", scope=SCOPE, reason="RandomPreempt") >= 1
    # The binder applied it but the answer was lost: the Reservation is still Active when the
    # forecaster retries; the retry finds the Run bound and keeps the published audit.
    crds.kubectl(
        "patch", h.RESERVATIONS, "big-resv", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": {"state": "Active"}}),
    )  # fmt: skip
    retry = await activate(client, resv)
    assert retry.released and "already holds leases" in retry.message
    after = h.get_json(crds, h.RESERVATIONS, "-n", namespace, "big-resv")["status"]
    assert after["state"] == "Released" and after["reason"] == "AlreadyRunning"
    assert after["audit"]["seed"] == seed and after["audit"]["draws"]
    assert after["activatedAt"] == "2025-01-06T09:00:00Z"


async def test_an_early_activate_is_refused_and_changes_nothing(
    crds: ControlPlane, namespace: str, client: ServiceRuntime
) -> None:
    make_run(crds, namespace, "early", "org:rstest:ops", 8)
    h.apply(
        crds,
        h.reservation_manifest(
            namespace, "early-resv", run="early", labels=DOMAIN, nodes=["rs-04"]
        ),  # due in 2099
    )
    resv = h.get_json(crds, h.RESERVATIONS, "-n", namespace, "early-resv")
    before = h.sample("jobtree_resolver_activations_total", outcome="Early")
    reply = await activate(client, resv)
    assert not reply.released and reply.message.startswith("Early: "), reply
    assert h.sample("jobtree_resolver_activations_total", outcome="Early") == before + 1
    after = h.get_json(crds, h.RESERVATIONS, "-n", namespace, "early-resv")
    assert "activatedAt" not in (after.get("status") or {}), after.get("status")
    assert open_leases_of(crds, namespace, "early") == []


async def cached(resolver: Resolver, *leases: str) -> None:
    """Until the resolver's watch cache shows the leases the test created with kubectl."""

    def shown() -> None:
        assert all(resolver.cache.lease(name) is not None for name in leases), (
            f"leases {leases} never reached the cache"
        )

    await h.eventually(shown, interval=0.1, in_thread=False)


def _nodes(items: list[dict[str, Any]], count: int) -> set[str]:
    assert len(items) == count, [x["metadata"]["name"] for x in items]
    return {x["spec"]["slice"]["nodes"][0] for x in items}


async def test_node_failure_swaps_the_rank_onto_its_spare(
    crds: ControlPlane, namespace: str, client: ServiceRuntime, services: Resolver
) -> None:
    train = make_run(
        crds, namespace, "train", "org:rstest:ops", 8, locality={"groupGPUs": 8}, sparesPerGroup=8
    )
    active = hold(crds, train, "rs-05")
    spare = hold(crds, train, "rs-06", role=Role.SPARE)
    await cached(services, active, spare)
    # A NODE_FAILED for a node that is Ready is a claim the resolver does not believe.
    refused = h.sample("jobtree_resolver_events_refused_total", reason="NodeNotFailed")
    await client.publish(NODE_FAILED, NodeFailed(node="rs-05", at=datetime.now(UTC), reason="test"))

    def dropped() -> None:
        got = h.sample("jobtree_resolver_events_refused_total", reason="NodeNotFailed")
        assert got == refused + 1

    await h.eventually(dropped)
    assert {x["metadata"]["name"] for x in open_leases_of(crds, namespace, "train")} == {
        active,
        spare,
    }
    # The node really fails (deleted): now the same event swaps the rank onto its spare.
    crds.kubectl("delete", "node", "rs-05")
    await client.publish(NODE_FAILED, NodeFailed(node="rs-05", at=datetime.now(UTC), reason="test"))

    def swapped() -> dict[str, Any]:
        items = open_leases_of(crds, namespace, "train")
        assert len(items) == 1, [x["metadata"]["name"] for x in items]
        return items[0]

    new = await h.eventually(swapped)
    assert new["spec"]["slice"]["nodes"] == ["rs-06"]
    assert (new["spec"]["slice"]["role"], new["spec"]["reason"]) == ("Active", "Swap")
    assert lease(crds, active)["status"]["closureReason"] == "NodeFailure"
    assert lease(crds, spare)["status"]["closureReason"] == "Swap"
    pod = await h.eventually(lambda: h.get_json(crds, "pods", "-n", namespace, "train-g0-r0"))
    assert pod["spec"]["nodeName"] == "rs-06"
    assert h.sample("jobtree_resolver_actions_total", kind="Swap") >= 1
    h.add_nodes(crds, "rs", 6, **LABELS, **{"gpu.flavor": h.FLAVOR})


@pytest.mark.parametrize(
    ("service", "metric"),
    [
        ("resolver", "jobtree_lottery_draws_total"),
        ("forecast", "jobtree_reservations_backlog_seconds"),
    ],
)
async def test_service_process_serves_probes_and_exits_cleanly_on_sigterm(
    crds: ControlPlane, nats_server: NatsServer, tmp_path: Path, service: str, metric: str
) -> None:
    log = tmp_path / f"{service}.log"
    proc, port = h.spawn_service(
        service,
        crds,
        nats_server,
        log,
        "--namespace=t-process-only",  # act on nothing of the other tests
        log_format="json",
    )
    try:
        await h.wait_ready(proc, port, log)
        assert h.http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        code, body = h.http_get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and metric in body
        assert await h.terminate(proc) == 0
    finally:
        h.kill(proc)
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(line["msg"] == f"{service} serving" for line in lines)
    assert any(line["msg"] == f"{service} stopped" for line in lines)
