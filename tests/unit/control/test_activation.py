"""Activation decisions and node-failure commits on engine scenarios (shared.control.activation)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from shared.bus.messages import CommitRequest, RunRef
from shared.control.activation import (
    Outcome,
    Target,
    activation_commit,
    after_ends,
    decide,
    failure_commits,
    preview,
)
from shared.control.commit_check import CommitPlan, plan_commit
from shared.control.reservations import read_reservation
from shared.engine.failures import on_node_failure
from shared.engine.lottery import lottery_seed, replay
from shared.engine.model import (
    Budget,
    Envelope,
    FundingKind,
    Lease,
    LeaseReason,
    Malleable,
    Node,
    ReservationClaim,
    Role,
    RunKey,
    RunRequest,
)
from shared.engine.resolver import random_preempt_closure
from shared.engine.state import ClusterState
from shared.engine.topology import MissingLabels, node_from_labels
from shared.kube.translate import budget_record, run_request

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FLAVOR = "H100-80GB"
NS = "team"
WEST_A = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"}
LABEL = "H100-80GB@us-west/gpu-a/nv-a"


def nodes(count: int = 4) -> list[Node]:
    out = []
    for i in range(1, count + 1):
        built = node_from_labels(f"a{i}", {**WEST_A, "gpu.flavor": FLAVOR}, {"nvidia.com/gpu": "8"})
        assert not isinstance(built, MissingLabels)
        out.append(built)
    return out


def budget(owner: str, concurrency: int = 64) -> Budget:
    name = owner.replace(":", "-")
    envelope = Envelope(name, owner, "main", FLAVOR, dict(WEST_A), concurrency)
    return Budget(name, owner, (), (envelope,))


def run(
    name: str,
    owner: str,
    total: int,
    *,
    group: int | None = 8,
    malleable: Malleable | None = None,
    checkpoint: timedelta | None = None,
) -> RunRequest:
    return RunRequest(
        key=(NS, name),
        uid=f"uid-{name}",
        owner=owner,
        flavor=FLAVOR,
        total_gpus=total,
        group_gpus=group,
        selector=dict(WEST_A),
        malleable=malleable,
        checkpoint=checkpoint,
        max_restarts=2 if checkpoint else 0,
        max_duration=timedelta(hours=4),
    )


def held(
    request: RunRequest,
    node: str,
    *,
    group: int = 0,
    rank: int = 0,
    role: Role = Role.ACTIVE,
    gpus: int = 8,
) -> Lease:
    tag = "s" if role is Role.SPARE else "r"
    return Lease(
        name=f"{request.key[1]}-g{group}-{tag}{rank}",
        run=request.key,
        owner=request.owner,
        node=node,
        gpus=gpus,
        role=role,
        group=group,
        rank=rank if role is not Role.SPARE else -1,
        envelope=f"{request.owner.replace(':', '-')}/main",
        payer_owner=request.owner,
        funding=FundingKind.OWNED,
        start=T0 - timedelta(hours=1),
        reason=LeaseReason.START,
    )


def world(
    leases: list[Lease],
    runs: list[RunRequest],
    claims: tuple[ReservationClaim, ...] = (),
) -> ClusterState:
    owners = sorted({r.owner for r in runs})
    return ClusterState.build(
        now=T0,
        nodes=nodes(),
        budgets=[budget(o) for o in owners],
        ledger=leases,
        runs={r.key: r for r in runs},
        claims=claims,
    )


BIG = run("big", "org:ai:rai", 16)
TARGET = Target(NS, "big-resv", "uid-resv-1", T0, nodes=("a1", "a2"))
REF = RunRef(namespace=NS, name="big", uid=BIG.uid, generation=3)


def checked(commit: CommitRequest, state: ClusterState) -> CommitPlan:
    """The binder's own validation accepts the commit."""
    got = plan_commit(commit, state)
    assert isinstance(got, CommitPlan), got
    return got


def test_fits_now_binds_on_the_intended_slice_without_cuts() -> None:
    other = run("other", "org:ai:lab", 8)
    state = world([held(other, "a3")], [BIG, other])
    act = decide(BIG, state, TARGET, generation=3)
    assert act.outcome is Outcome.BIND
    assert act.ends == () and act.seed is None
    assert act.intent is not None
    assert {lease.node for lease in act.intent.leases} == {"a1", "a2"}
    commit = activation_commit(act, TARGET, REF, version=7)
    assert commit.reason == "Reservation:team/big-resv"
    assert commit.ends == [] and len(commit.pods) == 2
    assert commit.budget_of == {"org-ai-rai/main": "org-ai-rai"}
    assert checked(commit, state).creates


def test_own_claim_does_not_block_but_another_claim_does() -> None:
    mine = ReservationClaim("big-resv", BIG.key, T0, ("a1", "a2"), 16)
    state = world([], [BIG], claims=(mine,))
    assert decide(BIG, state, TARGET).outcome is Outcome.BIND
    theirs = ReservationClaim("x", (NS, "x"), T0, ("a1", "a2", "a3", "a4"), 32)
    state = world([], [BIG], claims=(theirs,))
    strict = Target(NS, "big-resv", "u", T0, nodes=("a1", "a2"), strict=True)
    assert decide(BIG, state, strict).outcome is Outcome.BLOCKED


def test_busy_slice_binds_elsewhere_unless_the_reservation_is_strict() -> None:
    a = run("a", "org:ai:lab", 16)
    state = world([held(a, "a1"), held(a, "a2", rank=1)], [BIG, a])
    relaxed = decide(BIG, state, TARGET)
    assert relaxed.outcome is Outcome.BIND
    assert relaxed.intent is not None
    assert {lease.node for lease in relaxed.intent.leases} == {"a3", "a4"}
    strict = Target(NS, "big-resv", "uid-resv-1", T0, nodes=("a1", "a2"), strict=True)
    cut = decide(BIG, state, strict)
    assert cut.outcome is Outcome.RESOLVE
    assert cut.intent is not None
    assert {lease.node for lease in cut.intent.leases} == {"a1", "a2"}
    assert {name for name, _ in cut.ends} == {"a-g0-r0", "a-g0-r1"}


def test_structural_cuts_end_leases_then_bind_in_one_commit() -> None:
    elastic = run("elastic", "org:ai:nlp", 24, malleable=Malleable(8, 24, 8, 24))
    fixed = run("fixed", "org:ai:lab", 8)
    leases = [
        held(elastic, "a1", group=0, rank=0),
        held(elastic, "a2", group=1, rank=1),
        held(elastic, "a3", group=2, rank=2),
        held(fixed, "a4"),
    ]
    state = world(leases, [BIG, elastic, fixed])
    target = Target(NS, "big-resv", "uid-resv-1", T0)
    act = decide(BIG, state, target)
    assert act.outcome is Outcome.RESOLVE
    assert act.deficit == 16
    assert act.ends == (("elastic-g2-r2", "Shrink"), ("elastic-g1-r1", "Shrink"))
    assert act.seed is None  # no lottery needed
    assert act.intent is not None
    assert {lease.node for lease in act.intent.leases} == {"a2", "a3"}
    commit = activation_commit(act, target, REF, version=1)
    assert [end.name for end in commit.ends] == ["elastic-g2-r2", "elastic-g1-r1"]
    plan = checked(commit, state)
    assert {lease.name for lease, _ in plan.ends} == {"elastic-g2-r2", "elastic-g1-r1"}
    # Without the ends the same bind would overbook the nodes.
    bare = CommitRequest(key="k", run=REF, version=1, leases=commit.leases, pods=commit.pods)
    assert not isinstance(plan_commit(bare, state), CommitPlan)


def test_lottery_ends_drawn_runs_with_the_published_seed_that_replays() -> None:
    ckpt = run("job-e", "o:c", 8, checkpoint=timedelta(minutes=30))
    runs = [run("job-a", "o:a", 8), run("job-b", "o:a", 8), run("job-c", "o:b", 8), ckpt]
    leases = [held(r, f"a{i}") for i, r in enumerate(runs, start=1)]
    state = world(leases, [BIG, *runs])
    target = Target(NS, "big-resv", "7d0c-uid", T0)
    act = decide(BIG, state, target, restarts_used={ckpt.key: 0})
    assert act.outcome is Outcome.RESOLVE
    res = act.resolution
    assert res is not None and act.seed is not None
    assert act.seed == lottery_seed(LABEL, "7d0c-uid", T0)
    assert len(res.draws) == 2 and res.replays()
    assert replay(act.seed, res.tokens, res.lottery_deficit) == res.draws
    closure = random_preempt_closure(act.seed)
    assert all(c == closure for _, c in act.ends)
    assert set(res.conflict_set) == {r.key for r in runs}
    drawn = {d.token.run for d in res.draws}
    assert set(res.requeue) == drawn & {ckpt.key}
    assert set(res.failed) == drawn - {ckpt.key}
    commit = activation_commit(act, target, REF, version=2)
    assert {e.closure for e in commit.ends} == {f"RandomPreempt({act.seed})"}
    checked(commit, state)
    # The same activation decides the same way: the seed fixes the outcome.
    again = decide(BIG, state, target, restarts_used={ckpt.key: 0})
    assert again.ends == act.ends


def test_blocked_when_nothing_in_scope_may_be_cut() -> None:
    ghost = run("ghost", "org:ai:lab", 32)  # not in the runs map: never cut
    leases = [held(ghost, f"a{i}", rank=i) for i in range(1, 5)]
    state = ClusterState.build(
        now=T0,
        nodes=nodes(),
        budgets=[budget(BIG.owner)],
        ledger=leases,
        runs={BIG.key: BIG},
    )
    act = decide(BIG, state, TARGET)
    assert act.outcome is Outcome.BLOCKED
    assert act.reason == "DeficitNotCleared"
    assert act.intent is None and act.ends == ()


def test_cover_failure_without_reclaimable_funding_is_blocked_with_the_typed_reason() -> None:
    stranger = RunRequest(key=(NS, "s"), uid="u", owner="lab:nobody", flavor=FLAVOR, total_gpus=8)
    state = world([], [BIG])
    act = decide(stranger, state, Target(NS, "s-resv", "u", T0))
    assert act.outcome is Outcome.BLOCKED
    assert act.reason == "NoEnvelope"


def test_a_run_already_holding_leases_is_not_started_twice() -> None:
    state = world([held(BIG, "a1"), held(BIG, "a2", rank=1)], [BIG])
    act = decide(BIG, state, TARGET)
    assert act.outcome is Outcome.ALREADY_RUNNING and act.intent is None


def test_after_ends_frees_capacity_and_closes_the_ledger_entries() -> None:
    a = run("a", "org:ai:lab", 8)
    state = world([held(a, "a1")], [a])
    after = after_ends(state, [("a-g0-r0", "Shrink")])
    assert after.topology.free("a1") == 8
    assert [lease.closure for lease in after.ledger] == ["Shrink"]
    assert after_ends(state, [("nope", "Shrink")]) is state


def test_node_failure_swap_commits_ends_and_the_moved_rank_together() -> None:
    train = run("train", "org:ai:rai", 16)
    sweep = RunRequest(
        key=(NS, "sweep"),
        uid="uid-sweep",
        owner="org:ai:lab",
        flavor=FLAVOR,
        total_gpus=8,
        opportunistic=True,
    )
    leases = [
        held(train, "a1", rank=0),
        held(train, "a2", rank=1),
        held(train, "a3", role=Role.SPARE),
        Lease(
            name="sweep-g0-r0",
            run=sweep.key,
            owner=sweep.owner,
            node="a3",
            gpus=8,
            role=Role.BORROWED,
            group=0,
            rank=0,
            envelope="org-ai-lab/main",
            payer_owner=sweep.owner,
            funding=FundingKind.OWNED,
            start=T0,
            reason=LeaseReason.FILL,
        ),
    ]
    state = world(leases, [train, sweep])
    domains = {n.name: n.domain for n in nodes()}
    plan = on_node_failure("a2", state.open_leases, state.runs, node_domains=domains, now=T0)
    refs: dict[RunKey, RunRef] = {
        train.key: RunRef(namespace=NS, name="train", uid=train.uid, generation=1)
    }
    commits = failure_commits(plan, state, refs, version=9)
    assert len(commits) == 1
    commit = commits[0]
    assert commit.run == refs[train.key]
    assert {(e.name, e.closure) for e in commit.ends} == {
        ("sweep-g0-r0", "ReclaimedBySpare"),
        ("train-g0-s0", "Swap"),
        ("train-g0-r1", "NodeFailure"),
    }
    (new,) = commit.leases
    assert (new.node, new.rank, new.reason, new.role) == ("a3", 1, LeaseReason.SWAP, Role.ACTIVE)
    (pod,) = commit.pods
    assert (pod.name, pod.node, pod.rank, pod.world_size) == ("train-g0-r1", "a3", 1, 2)
    assert commit.reason == "NodeFailure:a2"
    # A re-sent plan names everything the same; the binder accepts it.
    assert failure_commits(plan, state, refs, version=9) == commits
    checked(commit, state)


def test_node_failure_without_spares_is_one_commit_of_ends() -> None:
    fixed = run("fixed", "org:ai:rai", 16, checkpoint=timedelta(minutes=10))
    state = world([held(fixed, "a1"), held(fixed, "a2", rank=1)], [fixed])
    domains = {n.name: n.domain for n in nodes()}
    plan = on_node_failure("a1", state.open_leases, state.runs, node_domains=domains, now=T0)
    (commit,) = failure_commits(plan, state, {}, version=1)
    assert commit.leases == [] and commit.pods == []
    assert {(e.name, e.closure) for e in commit.ends} == {
        ("fixed-g0-r0", "NodeFailure"),
        ("fixed-g0-r1", "Fail"),
    }
    assert commit.run.key == fixed.key and commit.run.uid == fixed.uid
    assert plan.requeue == (fixed.key,)
    assert (
        failure_commits(
            on_node_failure("a4", state.open_leases, state.runs, node_domains=domains, now=T0),
            state,
            {},
            version=1,
        )
        == []
    )


def test_the_sample_administrator_reservation_activates_on_its_named_nodes() -> None:
    """config/samples/reservations/reservation-example.yaml: 8 named nodes of nv-a for
    run-128-groups; they are busy while nv-a-09..16 are free, yet activation (strict) cuts the
    named nodes by the lottery and binds there, at the Run's narrowest start (64 GPUs)."""
    samples = Path(__file__).resolve().parents[3] / "config" / "samples"
    run_doc = yaml.safe_load((samples / "runs" / "run-128-groups.yaml").read_text())
    run_doc["metadata"].update(namespace="default", uid="run-uid", generation=1)
    request = run_request(run_doc)
    resv_doc = yaml.safe_load((samples / "reservations" / "reservation-example.yaml").read_text())
    resv_doc["metadata"].update(namespace="default", uid="resv-uid")
    view = read_reservation(resv_doc)
    assert not view.managed and view.run == ("default", "run-128-groups")
    budgets = [
        budget_record(yaml.safe_load((samples / "budgets" / name).read_text()))
        for name in ("budget-west-h100.yaml", "budget-vision-lending.yaml")
    ]
    other_env = Envelope("other", "org:other", "main", FLAVOR, dict(WEST_A), 64)
    budgets.append(Budget("other", "org:other", (), (other_env,)))
    fleet = []
    for i in range(1, 17):
        built = node_from_labels(
            f"gpu-a-{i:02d}", {**WEST_A, "gpu.flavor": FLAVOR}, {"nvidia.com/gpu": "8"}
        )
        assert not isinstance(built, MissingLabels)
        fleet.append(built)
    blockers = [
        RunRequest(
            key=("default", f"blocker-{b}"),
            uid=f"b{b}",
            owner="org:other",
            flavor=FLAVOR,
            total_gpus=32,
            group_gpus=32,
        )
        for b in (0, 1)
    ]
    leases = [
        Lease(
            name=f"blocker-{b}-r{r}",
            run=blockers[b].key,
            owner="org:other",
            node=f"gpu-a-{4 * b + r + 1:02d}",
            gpus=8,
            role=Role.ACTIVE,
            group=0,
            rank=r,
            envelope="other/main",
            payer_owner="org:other",
            funding=FundingKind.OWNED,
            start=T0,
            reason=LeaseReason.START,
        )
        for b in (0, 1)
        for r in range(4)
    ]
    state = ClusterState.build(
        now=T0,
        nodes=fleet,
        budgets=budgets,
        ledger=leases,
        runs={r.key: r for r in [request, *blockers]},
    )
    target = Target(
        view.namespace, view.name, view.uid, T0, nodes=view.nodes, strict=not view.managed
    )
    act = decide(request, state, target)
    assert act.outcome is Outcome.RESOLVE and act.seed is not None
    assert act.resolution is not None
    assert {d.token.run for d in act.resolution.draws} == {b.key for b in blockers}
    assert act.intent is not None
    assert {lease.node for lease in act.intent.leases} == set(view.nodes)
    assert sum(lease.gpus for lease in act.intent.leases) == 64
    assert {lease.envelope for lease in act.intent.leases} == {"west-h100/west-h100-nv-a"}
    relaxed = decide(request, state, dataclasses.replace(target, strict=False))
    assert relaxed.outcome is Outcome.BIND  # a forecast-made one would rather use free nodes
    # The forecaster's preview of the same activation: 64 missing on the slice, a lottery.
    seen = preview(request, state, target)
    assert (seen.deficit, seen.reason) == (64, "NoCapacity")
    assert seen.remedies.lottery_likely
    assert set(seen.remedies.conflict_set) == {b.key for b in blockers}


def test_leases_past_their_walltime_are_waited_for_not_cut() -> None:
    """A walltime ETA counts on leases the binder ends (TimeLimit) at that very instant: an
    activation that sees them still open waits for them instead of cutting anything."""
    wall = run("wall", "org:ai:lab", 16)
    other = run("other", "org:ai:nlp", 16)
    expired = [
        dataclasses.replace(held(wall, node, rank=i), expected_end=T0 - timedelta(seconds=1))
        for i, node in enumerate(("a1", "a2"))
    ]
    leases = [*expired, held(other, "a3"), held(other, "a4", rank=1)]
    state = world(leases, [BIG, wall, other])
    act = decide(BIG, state, TARGET)
    assert act.outcome is Outcome.WAIT
    assert act.reason == "AwaitingWalltime"
    assert act.intent is None and act.ends == () and act.seed is None
    # Once the binder has ended them the Run binds on its slice, no cut, no lottery.
    ended = after_ends(state, [(lease.name, "TimeLimit") for lease in expired])
    bound = decide(BIG, ended, TARGET)
    assert bound.outcome is Outcome.BIND and bound.ends == ()
    # A lease whose walltime is not over yet is not waited for: the usual cuts apply.
    running = [dataclasses.replace(x, expected_end=T0 + timedelta(minutes=5)) for x in expired]
    state = world([*running, held(other, "a3"), held(other, "a4", rank=1)], [BIG, wall, other])
    assert decide(BIG, state, TARGET).outcome is Outcome.RESOLVE
    # After the caller waited long enough (settle=False) it decides as before.
    late = decide(BIG, world(leases, [BIG, wall, other]), TARGET, settle=False)
    assert late.outcome is Outcome.RESOLVE
    assert {name for name, _ in late.ends} == {x.name for x in expired}
