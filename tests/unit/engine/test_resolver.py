"""Resolver rules: drop spares → shrink (borrowed first, highest index) → seeded lottery."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.lottery import lottery_seed, replay
from shared.engine.model import FundingKind, Lease, Role
from shared.engine.resolver import (
    Resolution,
    Scope,
    audit_line,
    conflict_set,
    random_preempt_closure,
    remedies,
    resolve,
)
from tests.unit.engine.ledgers import FLAVOR, T0, Ledger, elastic_run, fixed_run, width

LABEL = "H100-80GB@us-west/gpu-a/nv-a"
SCOPE = Scope(FLAVOR, frozenset({"a1", "a2", "a3", "a4"}), LABEL)
UID = "res-uid-1"
SEED = lottery_seed(LABEL, UID, T0)
CKPT = timedelta(minutes=30)


def run_resolve(ledger: Ledger, deficit: int, **kwargs: Any) -> Resolution:
    return resolve(
        deficit,
        SCOPE,
        ledger.leases,
        ledger.runs,
        reservation_uid=UID,
        activation=T0,
        **kwargs,
    )


def kinds(resolution: Resolution) -> list[str]:
    return [action.kind for action in resolution.actions]


# --- trivial cases ----------------------------------------------------------------------------


def test_no_deficit_does_nothing() -> None:
    ledger = Ledger()
    ledger.group(fixed_run("f", "org:a", 8), 0, ["a1"], 8)
    res = run_resolve(ledger, 0)
    assert res.actions == () and res.seed is None and res.freed == 0
    assert res.remaining_deficit == 0 and res.replays()


def test_lottery_seed_published_even_without_tokens() -> None:
    ledger = Ledger()
    ledger.group(fixed_run("far", "org:a", 8), 0, ["m1"], 8)  # out of scope
    res = run_resolve(ledger, 8)
    assert res.seed == SEED
    assert res.draws == () and res.conflict_set == ()
    assert res.remaining_deficit == 8 and res.lottery_deficit == 8


# --- step 1: spares ---------------------------------------------------------------------------


def test_drops_only_as_many_spares_as_needed_in_scope() -> None:
    ledger = Ledger()
    run = fixed_run("f", "org:a", 16, group_gpus=8, spares=1)
    ledger.group(run, 0, ["a1"], 8)
    ledger.group(run, 1, ["m1"], 8)
    ledger.spare(run, 0, "a2", 8)
    ledger.spare(run, 1, "m2", 8)  # out of scope: never dropped
    other = fixed_run("g", "org:b", 8, spares=1)
    ledger.group(other, 0, ["a3"], 8)
    ledger.spare(other, 0, "a4", 8)
    res = run_resolve(ledger, 8)
    assert kinds(res) == ["DropSpare"]
    assert res.actions[0].lease_names == ("f-g0-s0",)  # node a2 before a4
    assert res.actions[0].closure == "DropSpare"
    assert res.freed == 8 and res.seed is None and res.requeue == res.failed == ()


def test_spares_without_fill_go_first_and_fill_leaves_with_its_host() -> None:
    ledger = Ledger()
    run = fixed_run("f", "org:a", 8, spares=2)
    ledger.group(run, 0, ["a1"], 8)
    ledger.spare(run, 0, "a2", 8)  # hosts fill
    ledger.spare(run, 0, "a3", 8)
    opp = fixed_run("opp", "org:b", 8, opportunistic=True, checkpoint=CKPT, max_restarts=1)
    ledger.fill(opp, "a2", 8)
    res = run_resolve(ledger, 8)
    assert [a.lease_names for a in res.actions] == [("f-g0-s1",)]  # a3 first: no fill there
    res = run_resolve(ledger, 16)
    assert [(a.kind, a.run[1], a.lease_names, a.gpus) for a in res.actions] == [
        ("DropSpare", "f", ("f-g0-s1",), 8),
        ("DropSpare", "f", ("f-g0-s0",), 0),  # still occupied by the fill...
        ("DropSpare", "opp", ("opp-g0-r0",), 8),  # ...until the fill goes with it
    ]
    assert res.freed == 16 and res.requeue == (opp.key,)


# --- step 2: shrink ---------------------------------------------------------------------------


def shrinkable() -> Ledger:
    ledger = Ledger()
    el = elastic_run("el", "org:a", min_gpus=8, max_gpus=32, step=8)
    for g in range(4):
        sponsored = g == 1
        ledger.group(
            el,
            g,
            ["a1" if g < 2 else "a2"],
            8,
            funding=FundingKind.SPONSOR if sponsored else FundingKind.OWNED,
            payer_owner="org:sponsor" if sponsored else None,
        )
    return ledger


def test_shrink_borrowed_group_first_then_highest_index() -> None:
    ledger = shrinkable()
    res = run_resolve(ledger, 16)
    assert [(a.kind, a.lease_names) for a in res.actions] == [
        ("Shrink", ("el-g1-r1",)),
        ("Shrink", ("el-g3-r3",)),
    ]
    assert all(a.closure == "Shrink" for a in res.actions)
    assert res.seed is None


def test_shrink_never_below_min_then_lottery_gets_nothing_from_it() -> None:
    ledger = shrinkable()
    res = run_resolve(ledger, 100)
    ended = {n for a in res.actions for n in a.lease_names}
    assert width(ledger.leases, ("team", "el"), ended) == 8
    assert res.seed == SEED and res.conflict_set == ()  # at min: not a lottery token
    assert res.remaining_deficit == 100 - 24


def test_spares_before_shrink_and_removed_groups_take_their_spares() -> None:
    ledger = Ledger()
    el = elastic_run("el", "org:a", min_gpus=8, max_gpus=16, step=8, spares=1)
    ledger.group(el, 0, ["a1"], 8)
    ledger.group(el, 1, ["a2"], 8)
    ledger.spare(el, 0, "a3", 8)
    ledger.spare(el, 1, "m1", 8)  # out of scope
    res = run_resolve(ledger, 16)
    assert [(a.kind, a.lease_names, a.gpus) for a in res.actions] == [
        ("DropSpare", ("el-g0-s0",), 8),
        ("Shrink", ("el-g1-r1", "el-g1-s0"), 8),
    ]


def test_shrink_takes_from_the_run_furthest_above_min() -> None:
    ledger = Ledger()
    big = elastic_run("big", "org:a", min_gpus=8, max_gpus=40, step=8)
    small = elastic_run("small", "org:b", min_gpus=8, max_gpus=16, step=8)
    for g in range(5):
        ledger.group(big, g, ["a1"], 8)
    for g in range(2):
        ledger.group(small, g, ["a2"], 8)
    res = run_resolve(ledger, 32)
    # big: slack 32 → 24 → 16 → 8 (tie with small: run key order, "big" < "small") → small.
    assert [a.run[1] for a in res.actions] == ["big", "big", "big", "big"]
    res = run_resolve(ledger, 40)
    assert [a.run[1] for a in res.actions] == ["big", "big", "big", "big", "small"]


def test_shrink_ignores_groups_outside_scope() -> None:
    ledger = Ledger()
    el = elastic_run("el", "org:a", min_gpus=8, max_gpus=24, step=8)
    ledger.group(el, 0, ["a1"], 8)
    ledger.group(el, 1, ["a2"], 8)
    ledger.group(el, 2, ["m1"], 8)  # highest index, but freeing it helps nobody here
    res = run_resolve(ledger, 8)
    assert [a.lease_names for a in res.actions] == [("el-g1-r1",)]


# --- step 3: lottery --------------------------------------------------------------------------


def contested() -> Ledger:
    ledger = Ledger()
    for owner, name, node in [
        ("org:a", "a-1", "a1"),
        ("org:a", "a-2", "a2"),
        ("org:b", "b-1", "a3"),
        ("org:c", "c-1", "a4"),
    ]:
        ledger.group(fixed_run(name, owner, 8, checkpoint=CKPT, max_restarts=2), 0, [node], 8)
    return ledger


def test_lottery_uses_published_seed_and_replays() -> None:
    ledger = contested()
    res = run_resolve(ledger, 12)
    assert res.seed == SEED
    assert res.conflict_set == (("team", "a-1"), ("team", "a-2"), ("team", "b-1"), ("team", "c-1"))
    assert len(res.draws) == 2 and res.freed == 16
    assert replay(SEED, res.tokens, 12) == res.draws and res.replays()
    assert all(a.kind == "RandomPreempt" for a in res.actions)
    assert {a.closure for a in res.actions} == {random_preempt_closure(SEED)}
    assert res.actions[0].closure == f"RandomPreempt({SEED})"
    assert set(res.requeue) == {d.token.run for d in res.draws} and res.failed == ()


def test_lottery_only_after_structural_cuts() -> None:
    ledger = contested()
    spare_run = fixed_run("sp", "org:d", 8, spares=1)
    ledger.group(spare_run, 0, ["m1"], 8)
    ledger.spare(spare_run, 0, "a1", 8)
    el = elastic_run("el", "org:e", min_gpus=8, max_gpus=16, step=8)
    ledger.group(el, 0, ["a2"], 8)
    ledger.group(el, 1, ["a3"], 8)
    res = run_resolve(ledger, 20)
    assert kinds(res) == ["DropSpare", "Shrink", "RandomPreempt"]
    assert res.lottery_deficit == 4
    assert ("team", "el") not in res.conflict_set  # at its min after the shrink


def test_and_bundle_ends_whole_run_but_counts_only_scope_gpus() -> None:
    ledger = Ledger()
    gang = fixed_run("gang", "org:a", 24, group_gpus=8)
    ledger.group(gang, 0, ["a1"], 8)
    ledger.group(gang, 1, ["a2"], 8)
    ledger.group(gang, 2, ["m1"], 8)
    res = run_resolve(ledger, 4)
    (token,) = res.tokens
    assert token.group is None and token.gpus == 16 and len(token.lease_names) == 3
    assert res.actions[0].lease_names == ("gang-g0-r0", "gang-g1-r1", "gang-g2-r2")
    assert res.freed == 16 and res.failed == (gang.key,)


def test_protected_run_never_cut() -> None:
    ledger = contested()
    me = ("team", "a-1")
    res = run_resolve(ledger, 32, protected_runs=[me])
    assert me not in res.conflict_set
    assert all(a.run != me for a in res.actions)
    assert res.remaining_deficit == 8


def test_requeue_needs_checkpoint_and_restarts_left() -> None:
    ledger = Ledger()
    ckpt = fixed_run("ck", "org:a", 8, checkpoint=CKPT, max_restarts=1)
    plain = fixed_run("plain", "org:b", 8)
    ledger.group(ckpt, 0, ["a1"], 8)
    ledger.group(plain, 0, ["a2"], 8)
    res = run_resolve(ledger, 16)
    assert res.requeue == (ckpt.key,) and res.failed == (plain.key,)
    res = run_resolve(ledger, 16, restarts_used={ckpt.key: 1})
    assert res.requeue == () and res.failed == (ckpt.key, plain.key)


def test_node_scope_none_means_every_node_of_the_flavor() -> None:
    ledger = Ledger()
    ledger.group(fixed_run("h", "org:a", 8), 0, ["x1"], 8)
    ledger.group(fixed_run("other", "org:b", 8, flavor="A100"), 0, ["y1"], 8)
    res = resolve(
        8,
        Scope(FLAVOR, None, "H100-80GB@anywhere"),
        ledger.leases,
        ledger.runs,
        reservation_uid=UID,
        activation=T0,
    )
    assert res.conflict_set == (("team", "h"),) and res.freed == 8


# --- funding scope ----------------------------------------------------------------------------

ENVELOPE = "org:a/main"


def funded() -> Ledger:
    """Envelope org:a/main is used by its owner, a sibling (family) and a sponsor borrower."""
    ledger = Ledger()
    own = fixed_run("own", "org:a", 8, spares=1)
    ledger.group(own, 0, ["a1"], 8, envelope=ENVELOPE)
    ledger.spare(own, 0, "a2", 8, envelope=ENVELOPE)
    sib = fixed_run("sib", "org:s", 8, spares=1)
    kw = {"envelope": ENVELOPE, "payer_owner": "org:a", "funding": FundingKind.FAMILY}
    ledger.group(sib, 0, ["a3"], 8, **kw)
    ledger.spare(sib, 0, "m1", 8, **kw)
    el = elastic_run("bor", "org:x", min_gpus=8, max_gpus=16, step=8)
    ledger.group(el, 0, ["m2"], 8)
    ledger.group(
        el, 1, ["m3"], 8, envelope=ENVELOPE, payer_owner="org:a", funding=FundingKind.SPONSOR
    )
    return ledger


def test_funding_scope_touches_only_shared_and_borrowed_leases() -> None:
    ledger = funded()
    res = run_resolve(ledger, 100, funding_scope_envelope=ENVELOPE)
    ended = {n for a in res.actions for n in a.lease_names}
    assert not any(name.startswith("own-") for name in ended)
    assert kinds(res) == ["DropSpare", "Shrink", "RandomPreempt"]
    assert res.actions[0].lease_names == ("sib-g0-s0",)  # out of node scope, still counts
    assert res.actions[1].lease_names == ("bor-g1-r1",)
    assert res.conflict_set == (("team", "sib"),)
    assert res.freed == 24 and res.remaining_deficit == 76


def test_funding_scope_stops_at_deficit() -> None:
    res = run_resolve(funded(), 8, funding_scope_envelope=ENVELOPE)
    assert [a.lease_names for a in res.actions] == [("sib-g0-s0",)]


# --- previews ---------------------------------------------------------------------------------


def test_conflict_set_and_remedies_preview() -> None:
    ledger = contested()
    spare_run = fixed_run("sp", "org:d", 8, spares=1)
    ledger.group(spare_run, 0, ["m1"], 8)
    ledger.spare(spare_run, 0, "a1", 8)
    el = elastic_run("el", "org:e", min_gpus=8, max_gpus=16, step=8)
    ledger.group(el, 0, ["a2"], 8)
    ledger.group(el, 1, ["a3"], 8)
    runs = ledger.runs
    assert conflict_set(SCOPE, ledger.leases, runs) == (
        ("team", "a-1"),
        ("team", "a-2"),
        ("team", "b-1"),
        ("team", "c-1"),
    )
    rem = remedies(20, SCOPE, ledger.leases, runs)
    assert rem.spare_drops == {spare_run.key: 8}
    assert rem.shrinks == {el.key: 8}
    assert rem.deficit_after_cuts == 4 and rem.lottery_likely
    # Owner-first: org:a's two runs share 1/3, org:b and org:c 1/3 each.
    assert rem.kill_probability[("team", "b-1")] == pytest.approx(1 / 3)
    assert rem.kill_probability[("team", "a-1")] == pytest.approx(1 / 6)
    calm = remedies(8, SCOPE, ledger.leases, runs)
    assert not calm.lottery_likely and calm.kill_probability == {} and calm.shrinks == {}


def test_audit_line_is_greppable() -> None:
    res = run_resolve(contested(), 8)
    line = audit_line(res, SCOPE, "team/res-1")
    assert "RandomPreempt(" + SEED + ")" in line and "\n" not in line
    assert "conflictSet=[team/a-1,team/a-2,team/b-1,team/c-1]" in line


# --- properties -------------------------------------------------------------------------------

NODES = ["a1", "a2", "a3", "a4", "m1", "m2"]


@st.composite
def fleets(draw: st.DrawFn) -> Ledger:
    ledger = Ledger()
    for i in range(draw(st.integers(0, 6))):
        owner = draw(st.sampled_from(["org:a", "org:b", "org:c"]))
        groups = draw(st.integers(1, 3))
        size = draw(st.sampled_from([4, 8]))
        spares = draw(st.integers(0, 1))
        if draw(st.booleans()):
            min_groups = draw(st.integers(1, groups))
            run = elastic_run(
                f"e{i}",
                owner,
                min_gpus=min_groups * size,
                max_gpus=groups * size,
                step=size,
                spares=spares,
                checkpoint=CKPT,
                max_restarts=1,
            )
        else:
            run = fixed_run(f"f{i}", owner, groups * size, group_gpus=size, spares=spares)
        for g in range(groups):
            sponsored = draw(st.booleans())
            ledger.group(
                run,
                g,
                [draw(st.sampled_from(NODES))],
                size,
                funding=FundingKind.SPONSOR if sponsored else FundingKind.OWNED,
                payer_owner="org:z" if sponsored else None,
            )
            for _ in range(spares):
                ledger.spare(run, g, draw(st.sampled_from(NODES)), size)
    return ledger


@settings(max_examples=150, deadline=None)
@given(ledger=fleets(), deficit=st.integers(1, 80), protect=st.booleans())
def test_freed_covers_deficit_whenever_candidates_suffice(
    ledger: Ledger, deficit: int, protect: bool
) -> None:
    protected = [sorted(ledger.runs)[0]] if protect and ledger.runs else []
    most = run_resolve(ledger, 10**6, protected_runs=protected).freed
    res = run_resolve(ledger, deficit, protected_runs=protected)
    if most >= deficit:
        assert res.freed >= deficit and res.remaining_deficit == 0
    else:
        assert res.freed == most
    # Deterministic, replayable, never cuts protected runs, never below min, whole units only.
    assert res == run_resolve(ledger, deficit, protected_runs=protected)
    assert res.replays()
    ended = {n for a in res.actions for n in a.lease_names}
    by_name = ledger.by_name
    assert not any(by_name[n].run in protected for n in ended)
    for key, run in ledger.runs.items():
        if run.malleable is not None and key not in res.requeue + res.failed:
            assert width(ledger.leases, key, ended) >= run.malleable.min_gpus
    assert sum(a.gpus for a in res.actions) == res.freed
    assert len(ended) == sum(len(a.lease_names) for a in res.actions)


@settings(max_examples=100, deadline=None)
@given(ledger=fleets(), deficit=st.integers(1, 80), shared=st.lists(st.booleans(), max_size=40))
def test_funding_scope_never_touches_owner_or_unshared(
    ledger: Ledger, deficit: int, shared: list[bool]
) -> None:
    # Re-pay some working leases from the envelope of org:a with family funding.
    leases: list[Lease] = []
    for i, lease in enumerate(ledger.leases):
        if i < len(shared) and shared[i] and lease.owner != "org:a":
            lease = replace(
                lease, envelope=ENVELOPE, payer_owner="org:a", funding=FundingKind.FAMILY
            )
        leases.append(lease)
    res = resolve(
        deficit,
        SCOPE,
        leases,
        ledger.runs,
        reservation_uid=UID,
        activation=T0,
        funding_scope_envelope=ENVELOPE,
    )
    ended = {n for a in res.actions for n in a.lease_names}
    touched_runs = {lease.run for lease in leases if lease.name in ended}
    candidates = {
        lease.run
        for lease in leases
        if lease.envelope == ENVELOPE and lease.funding is not FundingKind.OWNED
    }
    assert touched_runs <= candidates | {
        lease.run for lease in leases if lease.role is Role.BORROWED
    }
    assert all(ledger.runs[run].owner != "org:a" for run in touched_runs)
