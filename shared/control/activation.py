"""Activation of a Reservation and the reaction to a node failure, as commits (pure).

The resolver service asks :func:`decide` what to do when a Reservation reaches its
``earliestStart`` and :func:`failure_commits` how to commit the engine's node-failure plan; both
return plain values the shell only has to send to the binder.

Activation (SPEC §3 *Activation and resolver*):

1. A Run that already holds working leases is not started twice (``AlreadyRunning``).
2. If the Run covers and packs now with its own claim excluded from protection, it binds —
   on the intended slice's nodes first; an administrator's Reservation (``strict``) only there,
   a forecast-made one anywhere in its location as a fallback (``Bind``).
3. Otherwise the deficit is computed in scope (flavor + location, restricted to the intended
   slice's nodes when it names some, and to the best domain for a Run whose groups must share
   one: :mod:`shared.engine.deficit`; or the paying envelope's concurrency when the owner's own
   envelope is held by relatives or borrowers) and the engine's ``resolve`` cuts — drop spares,
   shrink, then the lottery seeded from (scope, reservation uid, activation instant). The bind is
   recomputed on the state after those ends and committed together with them (``Resolve``).
   When packing still fails after the cuts (fragmentation), the deficit grows by a group and the
   resolution is recomputed: with the same seed a larger deficit only extends the cuts.
4. If no cut clears the way the Reservation is ``Blocked`` with the typed reason.

Leases in scope already past their walltime (``expected_end`` at or before now) are the binder's
to end with ``TimeLimit``: they are what a ``walltime`` ETA counted on. While any is still open
and the Run does not fit, the decision is ``Wait`` (decide again shortly) instead of cutting them
or the Runs around them. The forecaster activates at ``earliestStart``, the very instant the
binder's walltime check ends those leases, and whichever acts first must not change the outcome.
``settle=False`` (the caller waited long enough) decides without waiting.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from shared.bus.messages import CommitRequest, LeaseEnd, RunRef
from shared.engine.admit import Blocked, Start, try_start
from shared.engine.bindplan import (
    BindIntent,
    LeaseIntent,
    PodIntent,
    bind_plan,
    lease_name,
    pod_name,
)
from shared.engine.deficit import capacity_deficit
from shared.engine.failures import FailurePlan, NewLease
from shared.engine.forecast import forecast, request_scope, usage_at
from shared.engine.model import DomainKey, Lease, LeaseReason, Role, RunKey, RunRequest
from shared.engine.resolver import Remedies, Resolution, Scope, remedies, resolve
from shared.engine.state import ClusterState
from shared.engine.topology import Topology

RESERVATION_REASON = "Reservation:{namespace}/{name}"
NODE_FAILURE_REASON = "NodeFailure:{node}"
MAX_ROUNDS = 8
"""Resolutions tried with a growing deficit when the cuts do not make the bind pack."""


class Outcome(StrEnum):
    BIND = "Bind"
    """The Run fits now: bind only."""
    RESOLVE = "Resolve"
    """Cuts (and maybe the lottery) first, then the bind, in one commit."""
    BLOCKED = "Blocked"
    """No cut in scope makes the Run fit."""
    ALREADY_RUNNING = "AlreadyRunning"
    """The Run already holds working leases: release the Reservation without binding."""
    WAIT = "Wait"
    """Leases past their walltime hold the room: decide again once the binder ended them."""


@dataclass(frozen=True, slots=True)
class Target:
    """The Reservation being activated."""

    namespace: str
    name: str
    uid: str
    at: datetime
    """The activation instant (``status.activatedAt``): with the uid and scope it seeds the
    lottery."""
    nodes: tuple[str, ...] = ()
    """The intended slice's nodes (may be empty: anywhere in the location)."""
    strict: bool = False
    """Bind only on ``nodes`` (an administrator's promise of named nodes)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def commit_reason(self) -> str:
        """``CommitRequest.reason``: lets the binder exempt this Reservation's own claim."""
        return RESERVATION_REASON.format(namespace=self.namespace, name=self.name)


@dataclass(frozen=True, slots=True)
class Activation:
    """The decision: what to commit and what to publish."""

    outcome: Outcome
    scope: Scope
    deficit: int
    """GPUs the resolution was asked to free (0 when the Run fit)."""
    reason: str
    message: str
    intent: BindIntent | None = None
    resolution: Resolution | None = None
    funding_envelope: str | None = None

    @property
    def ends(self) -> tuple[tuple[str, str], ...]:
        """(lease, closure) pairs to commit before the bind."""
        return () if self.resolution is None else self.resolution.ended_leases

    @property
    def seed(self) -> str | None:
        return None if self.resolution is None else self.resolution.seed


# ---------------------------------------------------------------------------- state views


def restricted(state: ClusterState, nodes: Iterable[str]) -> ClusterState:
    """The snapshot with only ``nodes`` in the topology (their open leases kept)."""
    wanted = set(nodes)
    kept = [node for name in sorted(wanted) if (node := state.topology.node(name)) is not None]
    leases = [lease for lease in state.open_leases if lease.node in wanted]
    return dataclasses.replace(state, topology=Topology.build(kept, leases))


def after_ends(
    state: ClusterState, ends: Iterable[tuple[str, str]], at: datetime | None = None
) -> ClusterState:
    """The snapshot once the named open leases have closed (capacity and concurrency freed)."""
    closure = dict(ends)
    ended = [lease for lease in state.ledger if lease.open and lease.name in closure]
    if not ended:
        return state
    when = at or state.now
    ledger = tuple(
        dataclasses.replace(lease, end=when, closure=closure[lease.name])
        if lease.open and lease.name in closure
        else lease
        for lease in state.ledger
    )
    return dataclasses.replace(
        state,
        topology=state.topology.without_leases(ended),
        usage=usage_at(state.usage, ended, state.family.caps_for),
        ledger=ledger,
    )


def activation_scope(request: RunRequest, state: ClusterState, target: Target) -> Scope:
    """The Run's scope (flavor + location, its label seeds the lottery), limited to the slice."""
    base = request_scope(request, state)
    if not target.nodes:
        return base
    return Scope(base.flavor, frozenset(target.nodes), base.label)


def capacity_in(state: ClusterState, scope: Scope) -> int:
    total = 0
    for name in scope.nodes or ():
        node = state.topology.node(name)
        total += node.gpus if node is not None else 0
    return total


def overdue(state: ClusterState, scope: Scope) -> tuple[Lease, ...]:
    """Open leases on scope nodes whose walltime is over: the binder ends them (``TimeLimit``)."""
    nodes = scope.nodes or frozenset()
    return tuple(
        lease
        for lease in state.open_leases
        if lease.node in nodes
        and lease.expected_end is not None
        and lease.expected_end <= state.now
    )


def _attempt(request: RunRequest, state: ClusterState, target: Target) -> Start | Blocked:
    """Cover + pack with the own claim exempt: the slice first, then (unless strict) anywhere."""
    if target.nodes:
        got = try_start(request, restricted(state, target.nodes), own_claim=target.name)
        if isinstance(got, Start) or target.strict:
            return got
    return try_start(request, state, own_claim=target.name)


def _intent(
    request: RunRequest, start: Start, state: ClusterState, generation: int, attempt: int
) -> BindIntent:
    return bind_plan(
        request,
        start.placement,
        now=state.now,
        reason=LeaseReason.START,
        generation=generation,
        attempt=attempt,
    )


def _working(leases: Iterable[Lease], run: RunKey) -> bool:
    return any(lease.run == run and lease.role is not Role.SPARE for lease in leases)


# ---------------------------------------------------------------------------- decision


def decide(
    request: RunRequest,
    state: ClusterState,
    target: Target,
    *,
    generation: int = 0,
    attempt: int = 0,
    restarts_used: Mapping[RunKey, int] | None = None,
    settle: bool = True,
) -> Activation:
    """What activating ``target`` for ``request`` commits (see the module docstring)."""
    scope = activation_scope(request, state, target)
    if _working(state.open_leases, request.key):
        return Activation(
            Outcome.ALREADY_RUNNING,
            scope,
            0,
            "AlreadyRunning",
            f"Run {request.key[0]}/{request.key[1]} already holds leases",
        )
    first = _attempt(request, state, target)
    if isinstance(first, Start):
        return Activation(
            Outcome.BIND,
            scope,
            0,
            "Bound",
            f"fits now: {first.width} GPUs bound without cuts",
            intent=_intent(request, first, state, generation, attempt),
        )
    expiring = overdue(state, scope) if settle else ()
    if expiring:
        return Activation(
            Outcome.WAIT,
            scope,
            0,
            "AwaitingWalltime",
            f"{len(expiring)} leases in {scope.label} are past their walltime; waiting for the "
            "binder to end them (TimeLimit)",
        )
    funding_envelope: str | None = None
    if first.stage == "cover":
        funding_envelope = forecast(
            request, state, first, own_claim=target.name
        ).funding_scope_envelope
        if funding_envelope is None:
            return Activation(Outcome.BLOCKED, scope, 0, first.reason, first.message)
        deficit = max(first.shortfall, 1)
    else:
        missing = capacity_deficit(request, state.topology, scope)
        deficit, scope = missing.gpus, missing.scope
    limit = capacity_in(state, scope) if funding_envelope is None else None
    step = request.group_gpus or (request.malleable.step_gpus if request.malleable else 1)
    last: Blocked = first
    for _ in range(MAX_ROUNDS):
        resolution = resolve(
            deficit,
            scope,
            state.open_leases,
            state.runs,
            reservation_uid=target.uid,
            activation=target.at,
            protected_runs=(request.key,),
            funding_scope_envelope=funding_envelope,
            restarts_used=restarts_used,
        )
        if resolution.remaining_deficit > 0:
            return Activation(
                Outcome.BLOCKED,
                scope,
                deficit,
                "DeficitNotCleared",
                f"{last.reason}: cuts in {scope.label} free {resolution.freed} of the "
                f"{deficit} GPUs needed",
                funding_envelope=funding_envelope,
            )
        after = after_ends(state, resolution.ended_leases)
        got = _attempt(request, after, target)
        if isinstance(got, Start):
            return Activation(
                Outcome.RESOLVE,
                scope,
                deficit,
                "Resolved",
                f"ended {len(resolution.ended_leases)} leases ({resolution.freed} GPUs) "
                f"in {scope.label}, then bound {got.width} GPUs",
                intent=_intent(request, got, after, generation, attempt),
                resolution=resolution,
                funding_envelope=funding_envelope,
            )
        last = got
        if funding_envelope is not None:
            if got.stage != "cover":
                break
            deficit += max(got.shortfall, 1)
        else:
            deficit += max(capacity_deficit(request, after.topology, scope).gpus, step)
            if limit is not None and deficit > limit:
                break
    return Activation(
        Outcome.BLOCKED,
        scope,
        deficit,
        last.reason,
        f"no cut in {scope.label} lets the Run start: {last.message}",
        funding_envelope=funding_envelope,
    )


@dataclass(frozen=True, slots=True)
class Preview:
    """What activating now would face: the forecast an administrator's Reservation publishes."""

    deficit: int
    scope: Scope
    remedies: Remedies
    reason: str
    """The typed reason the Run cannot start on its slice now, or ``Fits``."""
    message: str
    funding_envelope: str | None = None


def _no_remedies() -> Remedies:
    return Remedies(0, {}, {}, 0, ())


def preview(request: RunRequest, state: ClusterState, target: Target) -> Preview:
    """Deficit in the activation scope and the remedies that would clear it (no lottery drawn)."""
    scope = activation_scope(request, state, target)
    if _working(state.open_leases, request.key):
        return Preview(0, scope, _no_remedies(), "AlreadyRunning", "the Run already holds leases")
    got = _attempt(request, state, target)
    if isinstance(got, Start):
        return Preview(0, scope, _no_remedies(), "Fits", f"{got.width} GPUs fit now")
    if got.stage == "cover":
        fc = forecast(request, state, got, own_claim=target.name)
        if fc.funding_scope_envelope is None:
            return Preview(0, scope, _no_remedies(), got.reason, got.message)
        return Preview(
            fc.deficit_gpus, scope, fc.remedies, got.reason, got.message, fc.funding_scope_envelope
        )
    missing = capacity_deficit(request, state.topology, scope)
    cuts = remedies(missing.gpus, missing.scope, state.open_leases, state.runs, (request.key,))
    return Preview(missing.gpus, missing.scope, cuts, got.reason, got.message)


# ---------------------------------------------------------------------------- commits


def _digest(*parts: object, length: int = 10) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def budget_of(leases: Iterable[LeaseIntent]) -> dict[str, str]:
    """Envelope key (``<budget>/<envelope>``) → Budget object name, for the binder."""
    out: dict[str, str] = {}
    for lease in leases:
        budget, sep, _ = lease.envelope.rpartition("/")
        if sep:
            out[lease.envelope] = budget
    return dict(sorted(out.items()))


def activation_commit(
    activation: Activation, target: Target, run: RunRef, version: int
) -> CommitRequest:
    """The one commit of an activation: the cuts' lease ends and the Run's bind together."""
    intent = activation.intent
    if intent is None:
        raise ValueError(f"activation {activation.outcome} has nothing to bind")
    ends = [LeaseEnd(name=name, closure=closure) for name, closure in activation.ends]
    key = intent.key
    if ends:
        key = f"{key}-{_digest(*sorted((e.name, e.closure) for e in ends))}"
    return CommitRequest(
        key=key,
        run=run,
        version=version,
        leases=list(intent.leases),
        pods=list(intent.pods),
        ends=ends,
        budget_of=budget_of(intent.leases),
        reason=target.commit_reason,
    )


def _incarnation(replaces: str | None) -> int:
    """A stable ``attempt`` for a swapped lease: each lease is replaced at most once."""
    return int(_digest(replaces or "", length=8), 16)


def _comp_path(new: NewLease, spare_index: int) -> tuple[str, ...]:
    if new.role is Role.SPARE or new.rank < 0:
        return (f"GROUP[{new.group}]", f"SPARE[{spare_index}]")
    return (f"GROUP[{new.group}]", f"RANK[{new.rank}]")


def swap_intents(
    starts: Sequence[NewLease], uids: Mapping[RunKey, str], generations: Mapping[RunKey, int]
) -> tuple[LeaseIntent, ...]:
    """Named leases for the plan's starts (reason ``Swap``; names derive from what they
    replace, so a re-sent plan names them the same)."""
    out: list[LeaseIntent] = []
    spares: dict[tuple[RunKey, int, str], int] = {}
    for new in starts:
        index = 0
        if new.role is Role.SPARE or new.rank < 0:
            slot = (new.run, new.group, new.node)
            index = spares[slot] = spares.get(slot, -1) + 1
        generation = generations.get(new.run, 0)
        out.append(
            LeaseIntent(
                name=lease_name(
                    new.run,
                    uids.get(new.run, ""),
                    group=new.group,
                    rank=new.rank,
                    node=new.node,
                    envelope=new.envelope,
                    reason=new.reason,
                    generation=generation,
                    attempt=_incarnation(new.replaces),
                ),
                run=new.run,
                owner=new.owner,
                node=new.node,
                gpus=new.gpus,
                role=new.role,
                group=new.group,
                rank=new.rank,
                envelope=new.envelope,
                payer_owner=new.payer_owner,
                funding=new.funding,
                start=new.start,
                reason=new.reason,
                expected_end=new.expected_end,
                comp_path=_comp_path(new, index),
            )
        )
    return tuple(out)


def _world_size(run: RunKey, leases: Iterable[Lease | LeaseIntent]) -> int:
    ranks = [x.rank for x in leases if x.run == run and x.role is not Role.SPARE and x.rank >= 0]
    return max(ranks, default=-1) + 1


def failure_domains(state: ClusterState, failed: str) -> dict[str, DomainKey]:
    """``on_node_failure``'s ``node_domains``: healthy schedulable nodes (swap targets) plus the
    failed node when still known."""
    domains = {node.name: node.domain for node in state.topology if node.schedulable}
    node = state.topology.node(failed)
    if node is not None:
        domains[failed] = node.domain
    else:
        domains.pop(failed, None)
    return domains


def failure_commits(
    plan: FailurePlan,
    state: ClusterState,
    runs: Mapping[RunKey, RunRef],
    version: int,
) -> list[CommitRequest]:
    """The binder commits of a node-failure plan.

    The binder starts leases and pods of one Run per commit, so the first commit carries every
    lease end of the plan (reclaimed fill included, which must go before the swaps it makes room
    for) with the first swapping Run's starts; each other swapping Run gets a commit with its
    own starts. A plan without swaps is one commit of ends. Moved ranks get their pod recreated
    on the spare's node (same name, rank and world size).
    """
    if not plan.ends and not plan.starts:
        return []
    uids = {key: ref.uid for key, ref in runs.items()}
    gens = {key: ref.generation for key, ref in runs.items()}
    for key, request in state.runs.items():
        uids.setdefault(key, request.uid)
    intents = swap_intents(plan.starts, uids, gens)
    ended = {name for name, _ in plan.ends}
    open_after = [lease for lease in state.open_leases if lease.name not in ended]
    order: list[RunKey] = list(dict.fromkeys(intent.run for intent in intents))
    by_name = {lease.name: lease for lease in state.ledger}
    if not order:
        first_end = by_name.get(plan.ends[0][0])
        order = [first_end.run] if first_end is not None else [("", "")]
    commits: list[CommitRequest] = []
    for index, key in enumerate(order):
        mine = tuple(intent for intent in intents if intent.run == key)
        world = _world_size(key, [*open_after, *mine])
        pods = [
            PodIntent(
                name=pod_name(key[1], intent.group, intent.rank),
                run=key,
                node=intent.node,
                gpus=sum(x.gpus for x in mine if x.rank == intent.rank and x.node == intent.node),
                group=intent.group,
                rank=intent.rank,
                role=intent.role,
                world_size=world,
                master=pod_name(key[1], 0, 0),
            )
            for intent in mine
            if intent.role is not Role.SPARE and intent.rank >= 0
        ]
        ends = [LeaseEnd(name=n, closure=c) for n, c in plan.ends] if index == 0 else []
        ref = runs.get(key) or RunRef(
            namespace=key[0], name=key[1], uid=uids.get(key, ""), generation=gens.get(key, 0)
        )
        commits.append(
            CommitRequest(
                key=f"nodefail-{_digest(plan.node, key, *sorted(ended), *(i.name for i in mine))}",
                run=ref,
                version=version,
                leases=list(mine),
                pods=list({pod.name: pod for pod in pods}.values()),
                ends=ends,
                budget_of=budget_of(mine),
                reason=NODE_FAILURE_REASON.format(node=plan.node),
            )
        )
    return commits
