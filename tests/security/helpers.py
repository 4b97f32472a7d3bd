"""What an attacker with publish rights sends, and how the tests see that nothing changed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from services.local.stack import LocalStack
from shared.bus import CommitReply, CommitRequest, LeaseEnd, RunRef, ServiceRuntime
from shared.bus.subjects import COMMIT
from shared.engine.bindplan import LeaseIntent, PodIntent, lease_name, pod_name
from shared.engine.model import FundingKind, LeaseReason, Role
from tests.e2e.conftest import GROUP, LEASES, RESERVATIONS, RUNS, eventually, get_json

T = TypeVar("T")
FLAVOR = "H100-80GB"


def on_bus(
    stack: LocalStack,
    act: Callable[[ServiceRuntime], Awaitable[T]],
    identity: str = "admission",
) -> T:
    """Run ``act`` as a compromised peer: a bus client of its own holding ``identity``'s NATS
    credentials, so it may publish what that service may (admission and the resolver may send
    commits); the binder's checks, not the bus permissions, must stop it. Returns its result."""
    assert stack.nats is not None

    async def main() -> T:
        runtime = ServiceRuntime(
            identity, nats_url=stack.nats_url, credentials=stack.nats.credentials(identity)
        )
        await runtime.start()
        try:
            return await act(runtime)
        finally:
            await runtime.stop()

    return asyncio.run(main())


def send_commit(stack: LocalStack, req: CommitRequest) -> CommitReply:
    async def act(runtime: ServiceRuntime) -> CommitReply:
        return await runtime.request(COMMIT, req, timeout=30)

    return on_bus(stack, act)


def sample(stack: LocalStack, service: str, name: str, **labels: str) -> float:
    """Sum of a service's samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(stack.services.metrics(service)):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def run_ref(stack: LocalStack, namespace: str, name: str) -> RunRef:
    return RunRef.of(get_json(stack, "-n", namespace, RUNS, name))


def hand_lease(
    ref: RunRef,
    *,
    owner: str,
    node: str,
    gpus: int,
    envelope: str,
    payer_owner: str,
    funding: FundingKind = FundingKind.OWNED,
    start: datetime | None = None,
    rank: int = 0,
) -> LeaseIntent:
    """A Lease intent written by hand, named the way the binder names them."""
    key = (ref.namespace, ref.name)
    return LeaseIntent(
        name=lease_name(
            key, ref.uid, group=0, rank=rank, node=node, envelope=envelope, reason=LeaseReason.START
        ),
        run=key,
        owner=owner,
        node=node,
        gpus=gpus,
        role=Role.ACTIVE,
        group=0,
        rank=rank,
        envelope=envelope,
        payer_owner=payer_owner,
        funding=funding,
        start=start or datetime.now(UTC),
        reason=LeaseReason.START,
        expected_end=None,
        comp_path=("GROUP[0]", f"RANK[{rank}]"),
    )


def hand_pod(lease: LeaseIntent, gpus: int | None = None) -> PodIntent:
    """The rank's pod for ``lease``, asking for ``gpus`` (default: the lease's)."""
    return PodIntent(
        name=pod_name(lease.run[1], lease.group, lease.rank),
        run=lease.run,
        node=lease.node,
        gpus=lease.gpus if gpus is None else gpus,
        group=lease.group,
        rank=lease.rank,
        role=lease.role,
        world_size=lease.rank + 1,
        master=pod_name(lease.run[1], 0, 0),
    )


def hand_commit(
    ref: RunRef,
    key: str,
    *,
    leases: Iterable[LeaseIntent] = (),
    pods: Iterable[PodIntent] = (),
    ends: Iterable[tuple[str, str]] = (),
    reason: str = "",
) -> CommitRequest:
    leases = list(leases)
    return CommitRequest(
        key=key,
        run=ref,
        version=0,
        leases=leases,
        pods=list(pods),
        ends=[LeaseEnd(name=n, closure=c) for n, c in ends],
        budget_of={le.envelope: le.envelope.split("/")[0] for le in leases},
        reason=reason,
    )


def free_nodes(stack: LocalStack, domain: str) -> list[str]:
    """Nodes of a fabric domain without any open Lease, by name."""
    nodes = get_json(stack, "nodes", "-l", f"fabric.domain={domain}")["items"]
    used = {
        n
        for lease in get_json(stack, LEASES)["items"]
        if not (lease.get("status") or {}).get("closed")
        for n in lease["spec"]["slice"]["nodes"]
    }
    return sorted(n["metadata"]["name"] for n in nodes if n["metadata"]["name"] not in used)


def world(stack: LocalStack, namespaces: Iterable[str]) -> dict[str, Any]:
    """What an attack must not change: every Lease of the namespaces (spec and status), every pod
    (uid, node, deletion), every Run's phase, width and restarts, every Reservation's state."""
    out: dict[str, Any] = {}
    for ns in namespaces:
        leases = get_json(stack, LEASES, "-l", f"{GROUP}/namespace={ns}")["items"]
        out[f"leases/{ns}"] = {
            x["metadata"]["name"]: (x["spec"], x.get("status") or {}) for x in leases
        }
        pods = get_json(stack, "-n", ns, "pods")["items"]
        out[f"pods/{ns}"] = {
            p["metadata"]["name"]: (
                p["metadata"]["uid"],
                p["spec"].get("nodeName"),
                p["metadata"].get("deletionTimestamp"),
            )
            for p in pods
        }
        runs = get_json(stack, "-n", ns, RUNS)["items"]
        out[f"runs/{ns}"] = {
            r["metadata"]["name"]: tuple(
                (r.get("status") or {}).get(k) for k in ("phase", "width", "restarts")
            )
            for r in runs
        }
        resvs = get_json(stack, "-n", ns, RESERVATIONS)["items"]
        out[f"reservations/{ns}"] = {
            r["metadata"]["name"]: tuple(
                (r.get("status") or {}).get(k) for k in ("state", "activatedAt", "audit")
            )
            for r in resvs
        }
    return out


def refused(reply: CommitReply, reason: str) -> None:
    assert not reply.ok, "the binder accepted the attack"
    assert reply.conflict.startswith(f"{reason}: "), reply.conflict
    assert not reply.created and not reply.ended, reply


def unchanged(stack: LocalStack, before: dict[str, Any], namespaces: Iterable[str]) -> None:
    """Nothing of ``before`` changed (read again after the attack was answered)."""
    assert world(stack, namespaces) == before


__all__ = ["eventually"]
