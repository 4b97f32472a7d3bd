"""Bind plan — turn a placement into the exact Leases and Pods one atomic commit creates (SPEC §3).

The binder re-validates and commits; this module only decides *what* the commit contains and how
its objects are named. Names are deterministic: re-sending the same commit (same run, placement,
reason, generation and attempt) yields the same names, so the binder sees existing objects and the
retry is a no-op; a new incarnation (restart, swap epoch) passes a new ``attempt`` and gets fresh
names, so the immutable ledger never reuses one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from shared.engine.model import FundingKind, Lease, LeaseReason, Role, RunKey, RunRequest
from shared.engine.pack import Placement

MAX_SUBDOMAIN = 253
MAX_LABEL = 63
_HASH_LEN = 10
_POD_HASH_LEN = 6
_INVALID_LABEL = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True, slots=True)
class LeaseIntent:
    """A Lease the commit will create: one rank's (or spare's) GPUs on one node, one payer."""

    name: str
    run: RunKey
    owner: str
    node: str
    gpus: int
    role: Role
    group: int
    rank: int
    envelope: str
    payer_owner: str
    funding: FundingKind
    start: datetime
    reason: LeaseReason
    expected_end: datetime | None
    comp_path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PodIntent:
    """A rank's pod: its node, GPUs (all payers summed) and rendezvous facts."""

    name: str
    run: RunKey
    node: str
    gpus: int
    group: int
    rank: int
    role: Role
    world_size: int
    master: str
    """Pod name of rank 0; the headless Service resolves it to the master address."""


@dataclass(frozen=True, slots=True)
class BindIntent:
    """Everything one atomic bind commits for a Run: all of it or none of it."""

    run: RunKey
    uid: str
    reason: LeaseReason
    generation: int
    attempt: int
    world_size: int
    master: str
    leases: tuple[LeaseIntent, ...]
    pods: tuple[PodIntent, ...]

    @property
    def key(self) -> str:
        """Idempotency key of the commit: the same plan always has the same key."""
        digest = _digest(self.run[0], self.uid, *sorted(lease.name for lease in self.leases))
        return f"{_subdomain(self.run[1], MAX_SUBDOMAIN - _HASH_LEN - 1)}-{digest}"

    @property
    def gpus(self) -> int:
        return sum(lease.gpus for lease in self.leases)

    def by_node(self) -> Mapping[str, int]:
        """GPUs the commit adds on each node: what the binder checks against capacity."""
        out: dict[str, int] = {}
        for lease in self.leases:
            out[lease.node] = out.get(lease.node, 0) + lease.gpus
        return MappingProxyType(dict(sorted(out.items())))


def _digest(*parts: object, length: int = _HASH_LEN) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _subdomain(name: str, limit: int) -> str:
    """A DNS-1123 subdomain prefix of at most ``limit`` chars (lowercase, alnum at both ends)."""
    labels = (_INVALID_LABEL.sub("-", part).strip("-") for part in name.lower().split("."))
    clean = ".".join(part for part in labels if part)[:limit].rstrip("-.")
    return clean or "run"


def lease_name(
    run: RunKey,
    uid: str,
    *,
    group: int,
    rank: int,
    node: str,
    envelope: str,
    reason: LeaseReason,
    generation: int = 0,
    attempt: int = 0,
) -> str:
    """``<run>-<hash>``: unique per (namespace, uid, group, rank, node, payer, reason, incarnation).

    Leases are cluster-scoped, so the namespace and uid are in the hash; the run name prefix is
    truncated to keep the whole name a valid DNS-1123 subdomain.
    """
    digest = _digest(run[0], uid, group, rank, node, envelope, reason.value, generation, attempt)
    return f"{_subdomain(run[1], MAX_SUBDOMAIN - _HASH_LEN - 1)}-{digest}"


def pod_name(run_name: str, group: int, rank: int) -> str:
    """``<run>-g<group>-r<rank>``, a DNS-1123 label; long or odd run names get a short hash."""
    suffix = f"-g{group}-r{rank}"
    clean = _INVALID_LABEL.sub("-", run_name.lower()).strip("-") or "run"
    if clean == run_name and len(clean) + len(suffix) <= MAX_LABEL:
        return clean + suffix
    # Sanitising or truncating could make two runs collide: a hash of the real name separates them.
    tag = "-" + _digest(run_name, length=_POD_HASH_LEN)
    room = MAX_LABEL - len(suffix) - len(tag)
    return (clean[:room].rstrip("-") or "run") + tag + suffix


def bind_plan(
    request: RunRequest,
    placement: Placement,
    *,
    now: datetime,
    reason: LeaseReason,
    generation: int = 0,
    attempt: int = 0,
    world_size: int | None = None,
) -> BindIntent:
    """Leases for every placed slice and a pod for every rank of the placement.

    ``world_size`` defaults to the highest placed rank + 1 (right for a start; a grow passes the
    new total). Spares get leases but no pods: they hold GPUs for a swap, they are not ranks.
    Borrowed slices (opportunistic fill, ``shared.engine.fill``) are ranks like Active ones; a
    start opens them with reason ``Fill``, so the ledger says the attempt began as fill.
    """
    run = request.key
    expected_end = now + request.max_duration if request.max_duration is not None else None
    leases: list[LeaseIntent] = []
    rank_slices: dict[int, list[tuple[str, int, int, Role]]] = {}
    spare_index: dict[tuple[int, str], int] = {}
    for s in placement.slices:
        if s.role is Role.SPARE or s.rank < 0:
            pos = spare_index.setdefault((s.group, s.node), len(spare_index))
            comp = (f"GROUP[{s.group}]", f"SPARE[{pos}]")
        else:
            comp = (f"GROUP[{s.group}]", f"RANK[{s.rank}]")
            rank_slices.setdefault(s.rank, []).append((s.node, s.gpus, s.group, s.role))
        fill_start = s.role is Role.BORROWED and reason is LeaseReason.START
        why = LeaseReason.FILL if fill_start else reason
        leases.append(
            LeaseIntent(
                name=lease_name(
                    run,
                    request.uid,
                    group=s.group,
                    rank=s.rank,
                    node=s.node,
                    envelope=s.envelope,
                    reason=why,
                    generation=generation,
                    attempt=attempt,
                ),
                run=run,
                owner=request.owner,
                node=s.node,
                gpus=s.gpus,
                role=s.role,
                group=s.group,
                rank=s.rank,
                envelope=s.envelope,
                payer_owner=s.payer_owner,
                funding=s.funding,
                start=now,
                reason=why,
                expected_end=expected_end,
                comp_path=comp,
            )
        )
    names = [lease.name for lease in leases]
    if len(set(names)) != len(names):
        raise ValueError("placement repeats a (group, rank, node, envelope) slice")
    size = world_size if world_size is not None else max(rank_slices, default=-1) + 1
    master = pod_name(run[1], 0, 0)
    pods: list[PodIntent] = []
    for rank in sorted(rank_slices):
        parts = rank_slices[rank]
        nodes = {node for node, _, _, _ in parts}
        if len(nodes) != 1:
            raise ValueError(f"rank {rank} is placed on several nodes: {sorted(nodes)}")
        node, _, group, role = parts[0]
        pods.append(
            PodIntent(
                name=pod_name(run[1], group, rank),
                run=run,
                node=node,
                gpus=sum(g for _, g, _, _ in parts),
                group=group,
                rank=rank,
                role=role,
                world_size=size,
                master=master,
            )
        )
    return BindIntent(
        run=run,
        uid=request.uid,
        reason=reason,
        generation=generation,
        attempt=attempt,
        world_size=size,
        master=master,
        leases=tuple(leases),
        pods=tuple(pods),
    )


def to_leases(intent: BindIntent) -> tuple[Lease, ...]:
    """The ledger records the commit creates, so accounting and topology can apply a plan."""
    return tuple(
        Lease(
            name=li.name,
            run=li.run,
            owner=li.owner,
            node=li.node,
            gpus=li.gpus,
            role=li.role,
            group=li.group,
            rank=li.rank,
            envelope=li.envelope,
            payer_owner=li.payer_owner,
            funding=li.funding,
            start=li.start,
            reason=li.reason,
            expected_end=li.expected_end,
        )
        for li in intent.leases
    )
