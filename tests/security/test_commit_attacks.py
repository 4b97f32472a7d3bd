"""A compromised peer that can publish ``binder.commit`` sends hand-written commits (issue 8 §2).

Each attack below was accepted before the binder re-derived commits from its own caches; each
must now be refused with its typed reason, counted in ``jobtree_binder_conflicts_total``, and
leave every Lease, Pod, Run status and Reservation of both tenants exactly as it was.

The scene: tenant ``red:victim`` runs an 8-GPU gang in ``sec-victim``; tenant ``blue:attacker``
(namespace ``sec-attacker``, no family of the victim) has a Run it cannot fund (16 GPUs, an
8-GPU envelope), so nothing honest ever binds it while the attacks go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec.structs
import pytest

from services.local.stack import LocalStack
from shared.bus import CommitRequest, ServiceRuntime, decode
from shared.bus.subjects import COMMIT
from shared.engine.model import FundingKind
from tests.e2e.helpers import (
    NV_A,
    apply_yaml,
    budget_manifest,
    envelope,
    run_manifest,
    running_pods,
    setup_namespace,
    teardown,
    wait_running,
)

from .helpers import (
    free_nodes,
    hand_commit,
    hand_lease,
    hand_pod,
    on_bus,
    refused,
    run_ref,
    sample,
    send_commit,
    unchanged,
    world,
)

VICTIM_NS, ATTACKER_NS = "sec-victim", "sec-attacker"
VICTIM, ATTACKER = "red:victim", "blue:attacker"
VICTIM_ENV, ATTACKER_ENV = "sec-victim/victim-nv-a", "sec-attacker/attacker-nv-a"
NAMESPACES = (VICTIM_NS, ATTACKER_NS)


@pytest.fixture(scope="module")
def scene(stack: LocalStack) -> Iterator[dict[str, Any]]:
    """The victim's running gang and the attacker's unfundable Run."""
    setup_namespace(stack, VICTIM_NS, VICTIM)
    setup_namespace(stack, ATTACKER_NS, ATTACKER)
    apply_yaml(
        stack,
        # The victim's envelope would even lend to the attacker's team, had its Run asked.
        budget_manifest(
            "sec-victim",
            VICTIM,
            [envelope("victim-nv-a", NV_A, 32, lending={"allow": True, "to": ["blue:*"]})],
        ),
        budget_manifest("sec-attacker", ATTACKER, [envelope("attacker-nv-a", NV_A, 8)]),
        run_manifest("victim", VICTIM_NS, VICTIM, 8, group_gpus=8),
        run_manifest("greedy", ATTACKER_NS, ATTACKER, 16, group_gpus=8),
    )
    wait_running(stack, VICTIM_NS, "victim", 8)
    (pod,) = running_pods(stack, VICTIM_NS, "victim", 1)
    leases = [
        x
        for x in stack_leases(stack, VICTIM_NS)
        if x["metadata"]["labels"].get("rq.davidlangworthy.io/run") == "victim"
    ]
    (lease,) = leases
    yield {
        "lease": lease["metadata"]["name"],
        "node": lease["spec"]["slice"]["nodes"][0],
        "pod": pod["metadata"]["name"],
        "victim": run_ref(stack, VICTIM_NS, "victim"),
        "attacker": run_ref(stack, ATTACKER_NS, "greedy"),
    }
    teardown(stack, VICTIM_NS, ["sec-victim"])
    teardown(stack, ATTACKER_NS, ["sec-attacker"])


def stack_leases(stack: LocalStack, namespace: str) -> list[dict[str, Any]]:
    from tests.e2e.conftest import LEASES, get_json

    items: list[dict[str, Any]] = get_json(
        stack, LEASES, "-l", f"rq.davidlangworthy.io/namespace={namespace}"
    )["items"]
    return items


def conflicts(stack: LocalStack, reason: str) -> float:
    return sample(stack, "binder", "jobtree_binder_conflicts_total", reason=reason)


def test_closing_another_tenants_lease_with_a_false_reason_is_refused(
    stack: LocalStack, scene: dict[str, Any]
) -> None:
    lease, node = scene["lease"], scene["node"]
    before = world(stack, NAMESPACES)
    counted = conflicts(stack, "UnjustifiedEnd")
    attacks = [
        # From the attacker's own Run: the lease is not its own.
        hand_commit(scene["attacker"], "a1", ends=[(lease, "Completed")]),
        # In the victim's name, as if its gang had completed: its lifecycle says it has not.
        hand_commit(
            scene["victim"], "a2", ends=[(lease, "Completed")], reason="Lifecycle:Completed"
        ),
        # As if its node had failed: the node is Ready.
        hand_commit(
            scene["victim"], "a3", ends=[(lease, "NodeFailure")], reason=f"NodeFailure:{node}"
        ),
        # As a shrink: the Run is not malleable, its desired width keeps the lease.
        hand_commit(scene["victim"], "a4", ends=[(lease, "Shrink")], reason="Shrink"),
        # As an activation's lottery: no such Reservation.
        hand_commit(
            scene["attacker"],
            "a5",
            ends=[(lease, "RandomPreempt(0000)")],
            reason=f"Reservation:{ATTACKER_NS}/none",
        ),
    ]
    for attack in attacks:
        reply = send_commit(stack, attack)
        expected = "UnverifiedReservation" if attack.key == "a5" else "UnjustifiedEnd"
        refused(reply, expected)
    unchanged(stack, before, NAMESPACES)
    assert conflicts(stack, "UnjustifiedEnd") == counted + 4


def test_a_lease_paid_by_another_teams_envelope_is_refused(
    stack: LocalStack, scene: dict[str, Any]
) -> None:
    node = free_nodes(stack, "nv-a")[0]
    ref = scene["attacker"]
    before = world(stack, NAMESPACES)
    stolen = hand_lease(
        ref, owner=ATTACKER, node=node, gpus=8, envelope=VICTIM_ENV, payer_owner=VICTIM
    )
    as_sponsor = hand_lease(
        ref,
        owner=ATTACKER,
        node=node,
        gpus=8,
        envelope=VICTIM_ENV,
        payer_owner=VICTIM,
        funding=FundingKind.SPONSOR,
    )
    impersonated = hand_lease(
        ref, owner=VICTIM, node=node, gpus=8, envelope=VICTIM_ENV, payer_owner=VICTIM
    )
    for key, lease, reason in (
        ("p1", stolen, "IneligiblePayer"),
        ("p2", as_sponsor, "IneligiblePayer"),
        ("p3", impersonated, "OwnerMismatch"),
    ):
        reply = send_commit(stack, hand_commit(ref, key, leases=[lease], pods=[hand_pod(lease)]))
        refused(reply, reason)
    unchanged(stack, before, NAMESPACES)


def test_a_pod_asking_for_more_gpus_than_its_lease_is_refused(
    stack: LocalStack, scene: dict[str, Any]
) -> None:
    node = free_nodes(stack, "nv-a")[0]
    ref = scene["attacker"]
    before = world(stack, NAMESPACES)
    lease = hand_lease(
        ref, owner=ATTACKER, node=node, gpus=4, envelope=ATTACKER_ENV, payer_owner=ATTACKER
    )
    reply = send_commit(stack, hand_commit(ref, "g1", leases=[lease], pods=[hand_pod(lease, 8)]))
    refused(reply, "PodGPUs")
    unchanged(stack, before, NAMESPACES)


def test_a_back_dated_lease_is_refused(stack: LocalStack, scene: dict[str, Any]) -> None:
    node = free_nodes(stack, "nv-a")[0]
    ref = scene["attacker"]
    before = world(stack, NAMESPACES)
    for key, start in (
        ("t1", datetime.now(UTC) - timedelta(hours=2)),
        ("t2", datetime.now(UTC) + timedelta(hours=2)),
    ):
        lease = hand_lease(
            ref,
            owner=ATTACKER,
            node=node,
            gpus=8,
            envelope=ATTACKER_ENV,
            payer_owner=ATTACKER,
            start=start,
        )
        reply = send_commit(stack, hand_commit(ref, key, leases=[lease], pods=[hand_pod(lease)]))
        refused(reply, "StartTime")
    unchanged(stack, before, NAMESPACES)


def test_a_replayed_commit_key_with_different_content_is_refused(
    stack: LocalStack, scene: dict[str, Any]
) -> None:
    """The attacker listens on ``binder.commit``, records admission's honest commit for a new
    Run, and re-sends its key with other content once it is applied."""

    async def capture(runtime: ServiceRuntime) -> CommitRequest:
        seen: asyncio.Queue[CommitRequest] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            req = decode(msg.data, CommitRequest)
            if req.run.name == "honest":
                await seen.put(req)

        sub = await runtime.nc.subscribe(COMMIT.name, cb=on_msg)
        try:
            await asyncio.to_thread(
                apply_yaml, stack, run_manifest("honest", VICTIM_NS, VICTIM, 8, group_gpus=8)
            )
            return await asyncio.wait_for(seen.get(), 60)
        finally:
            await sub.unsubscribe()

    honest = on_bus(stack, capture, identity="binder")  # only the binder may read commits
    wait_running(stack, VICTIM_NS, "honest", 8)
    running_pods(stack, VICTIM_NS, "honest", 1)
    before = world(stack, NAMESPACES)
    # The very same commit again is a no-op that succeeds (idempotency by content) …
    again = send_commit(stack, honest)
    assert again.ok, again.conflict
    # … the same key with other content is refused, whatever else it would do.
    for changed in (
        msgspec.structs.replace(honest, pods=[]),
        msgspec.structs.replace(honest, reason="Grow"),
    ):
        refused(send_commit(stack, changed), "KeyReused")
    unchanged(stack, before, NAMESPACES)
