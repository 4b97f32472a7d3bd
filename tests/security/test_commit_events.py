"""Events and activation are claims the receiver verifies (issue 8 §3).

A peer that can publish ``events.node.failed`` or send ``resolver.activate`` tries to make the
resolver cut a healthy gang or pick the lottery's draw. Each attempt must change nothing: no
Lease, Pod, Run status or Reservation status of the tenant moves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from services.local.stack import LocalStack
from shared.bus import ActivateReply, ActivateRequest, NodeFailed, ServiceRuntime
from shared.bus.subjects import ACTIVATE, NODE_FAILED
from tests.e2e.conftest import LEASES, RESERVATIONS, eventually, get_json
from tests.e2e.helpers import (
    NV_A,
    apply_yaml,
    budget_manifest,
    envelope,
    rfc3339,
    run_manifest,
    running_pods,
    setup_namespace,
    teardown,
    wait_running,
)

from .helpers import on_bus, sample, unchanged, world

NS, OWNER = "sec-events", "sec:events"
NAMESPACES = (NS,)


@pytest.fixture(scope="module")
def scene(stack: LocalStack) -> Iterator[dict[str, Any]]:
    """A running 8-GPU gang, and a Run whose administrator Reservation is due in an hour."""
    setup_namespace(stack, NS, OWNER)
    apply_yaml(
        stack,
        budget_manifest("sec-events", OWNER, [envelope("events-nv-a", NV_A, 8)]),
        run_manifest("busy", NS, OWNER, 8, group_gpus=8),
    )
    wait_running(stack, NS, "busy", 8)
    running_pods(stack, NS, "busy", 1)
    leases = get_json(stack, LEASES, "-l", f"rq.davidlangworthy.io/namespace={NS}")["items"]
    (lease,) = [x for x in leases if not (x.get("status") or {}).get("closed")]
    node = lease["spec"]["slice"]["nodes"][0]
    # Waits behind "busy" (the envelope is spent); its Reservation promises busy's node later.
    apply_yaml(
        stack,
        run_manifest("later", NS, OWNER, 8, group_gpus=8),
        {
            "apiVersion": "rq.davidlangworthy.io/v1",
            "kind": "Reservation",
            "metadata": {"name": "later-admin", "namespace": NS},
            "spec": {
                "runRef": {"name": "later"},
                "intendedSlice": {"domain": dict(NV_A), "nodes": [node]},
                "earliestStart": rfc3339(datetime.now(UTC) + timedelta(hours=1)),
            },
        },
    )

    def initialised() -> dict[str, Any]:
        obj: dict[str, Any] = get_json(stack, "-n", NS, RESERVATIONS, "later-admin")
        assert (obj.get("status") or {}).get("state") == "Pending", obj.get("status")
        return obj

    resv = eventually(initialised, timeout=60)
    yield {"node": node, "reservation": resv}
    teardown(stack, NS, ["sec-events"])


def test_a_forged_node_failed_for_a_healthy_node_changes_nothing(
    stack: LocalStack, scene: dict[str, Any]
) -> None:
    node = scene["node"]
    before = world(stack, NAMESPACES)
    counted = sample(
        stack, "resolver", "jobtree_resolver_events_refused_total", reason="NodeNotFailed"
    )

    async def forge(runtime: ServiceRuntime) -> None:
        event = NodeFailed(node=node, at=datetime.now(UTC), reason="NodeDeleted")
        await runtime.publish(NODE_FAILED, event)

    on_bus(stack, forge, identity="packer")  # the only publisher of NODE_FAILED

    def dropped() -> None:
        got = sample(
            stack, "resolver", "jobtree_resolver_events_refused_total", reason="NodeNotFailed"
        )
        assert got == counted + 1, f"the resolver has not judged the event yet ({got})"

    eventually(dropped, timeout=30)
    unchanged(stack, before, NAMESPACES)


def test_an_early_activate_is_refused(stack: LocalStack, scene: dict[str, Any]) -> None:
    meta = scene["reservation"]["metadata"]
    before = world(stack, NAMESPACES)

    async def activate(runtime: ServiceRuntime) -> ActivateReply:
        req = ActivateRequest(namespace=NS, name=meta["name"], uid=meta["uid"])
        return await runtime.request(ACTIVATE, req, timeout=30)

    reply = on_bus(stack, activate, identity="forecast")  # the only sender of ACTIVATE
    assert not reply.released and reply.seed is None, reply
    assert reply.message.startswith("Early: "), reply.message
    unchanged(stack, before, NAMESPACES)


def test_an_activate_carrying_a_chosen_time_is_refused(
    stack: LocalStack, scene: dict[str, Any]
) -> None:
    """The activation instant seeds the lottery; the request has no field for it, and a payload
    that brings one anyway is refused as malformed (and dead-lettered)."""
    meta = scene["reservation"]["metadata"]
    before = world(stack, NAMESPACES)
    chosen = "2030-01-01T00:00:00Z"
    payload = {"namespace": NS, "name": meta["name"], "uid": meta["uid"], "at": chosen}

    async def send(runtime: ServiceRuntime) -> tuple[dict[str, str], bytes]:
        msg = await runtime.nc.request(ACTIVATE.name, json.dumps(payload).encode(), timeout=30)
        return dict(msg.headers or {}), msg.data

    headers, data = on_bus(stack, send, identity="forecast")
    assert "unknown field `at`" in headers.get(ERROR_HEADER, ""), (headers, data)
    assert headers.get(ERROR_CODE_HEADER) == "400" and not data, (headers, data)
    unchanged(stack, before, NAMESPACES)
