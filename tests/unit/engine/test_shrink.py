"""Shrinking malleable runs by whole groups: borrowed, then highest index first; never below min."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.model import FundingKind, RunRequest
from shared.engine.shrink import (
    current_width,
    cut_unit,
    shrink_groups,
    shrink_order,
    shrink_plan,
)
from tests.unit.engine.ledgers import Ledger, elastic_run, fixed_run, width


def elastic_four_groups(borrowed: tuple[int, ...] = ()) -> tuple[Ledger, RunRequest]:
    ledger = Ledger()
    run = elastic_run("el", "org:a", min_gpus=8, max_gpus=32, step=8)
    for g in range(4):
        funding = FundingKind.SPONSOR if g in borrowed else FundingKind.OWNED
        payer = "org:sponsor" if g in borrowed else None
        ledger.group(run, g, [f"n{g}"], 8, funding=funding, payer_owner=payer)
    return ledger, run


def test_current_width_counts_working_gpus_only() -> None:
    ledger = Ledger()
    run = fixed_run("f", "org:a", 16)
    ledger.group(run, 0, ["n1", "n2"], 8)
    ledger.spare(run, 0, "n3", 8)
    assert current_width(ledger.leases) == 16
    opp = fixed_run("o", "org:b", 4, opportunistic=True)
    assert current_width([ledger.fill(opp, "n3", 4)]) == 4


def test_highest_index_first() -> None:
    ledger, run = elastic_four_groups()
    assert shrink_order(ledger.leases) == (3, 2, 1, 0)
    assert shrink_plan(run, ledger.leases, 16) == ("el-g3-r3", "el-g2-r2")


def test_borrowed_groups_go_first() -> None:
    ledger, run = elastic_four_groups(borrowed=(0, 2))
    assert shrink_order(ledger.leases) == (2, 0, 3, 1)
    assert shrink_plan(run, ledger.leases, 16) == ("el-g2-r2", "el-g0-r0")


def test_never_below_min_or_target() -> None:
    ledger, run = elastic_four_groups()
    assert shrink_groups(run, ledger.leases, 0) == (3, 2, 1)
    assert shrink_groups(run, ledger.leases, 20) == (3,)  # 24 ≥ 20; 16 would undershoot
    assert shrink_groups(run, ledger.leases, 32) == ()


def test_skips_a_group_that_would_undershoot_and_takes_a_smaller_one() -> None:
    ledger = Ledger()
    run = elastic_run("el", "org:a", min_gpus=12, max_gpus=28, step=4, group_gpus=8)
    ledger.group(run, 0, ["n0"], 8)
    ledger.group(run, 1, ["n1"], 8, funding=FundingKind.SPONSOR)
    ledger.group(run, 2, ["n2"], 8)
    ledger.group(run, 3, ["n3"], 4)
    # Borrowed g1 first (28 → 20), then g3 (→ 16); g2 and g0 would go below 12.
    assert shrink_groups(run, ledger.leases, 12) == (1, 3)


def test_spares_of_removed_groups_go_too() -> None:
    ledger = Ledger()
    run = elastic_run("el", "org:a", min_gpus=8, max_gpus=16, step=8, spares=1)
    ledger.group(run, 0, ["n0"], 8)
    ledger.spare(run, 0, "s0", 8)
    ledger.group(run, 1, ["n1"], 8)
    ledger.spare(run, 1, "s1", 8)
    assert shrink_plan(run, ledger.leases, 8) == ("el-g1-r1", "el-g1-s0")


def test_fixed_runs_never_shrink() -> None:
    ledger = Ledger()
    run = fixed_run("f", "org:a", 16, group_gpus=8)
    ledger.group(run, 0, ["n0"], 8)
    ledger.group(run, 1, ["n1"], 8)
    assert shrink_plan(run, ledger.leases, 8) == ()


def test_cut_unit_group_or_whole_run() -> None:
    ledger, run = elastic_four_groups()
    leases = ledger.leases
    assert cut_unit(run, leases, leases[3]) == ("el-g3-r3",)
    fixed = fixed_run("f", "org:a", 16, group_gpus=8)
    other = Ledger()
    other.group(fixed, 0, ["n0"], 8)
    other.group(fixed, 1, ["n1"], 8)
    assert cut_unit(fixed, other.leases, other.leases[0]) == ("f-g0-r0", "f-g1-r1")
    at_min = Ledger()
    small = elastic_run("m", "org:a", min_gpus=16, max_gpus=16, step=8)
    at_min.group(small, 0, ["n0"], 8)
    at_min.group(small, 1, ["n1"], 8)
    assert cut_unit(small, at_min.leases, at_min.leases[1]) == ("m-g0-r0", "m-g1-r1")
    assert cut_unit(None, at_min.leases, at_min.leases[1]) == ("m-g1-r1",)


@settings(max_examples=200)
@given(
    sizes=st.lists(st.integers(1, 16), min_size=1, max_size=8),
    sponsored=st.lists(st.booleans(), min_size=8, max_size=8),
    min_frac=st.floats(0.0, 1.0),
    target=st.integers(0, 140),
)
def test_shrink_never_below_min_nor_target(
    sizes: list[int], sponsored: list[bool], min_frac: float, target: int
) -> None:
    total = sum(sizes)
    min_gpus = max(1, int(total * min_frac))
    run = elastic_run("p", "org:a", min_gpus=min_gpus, max_gpus=total, step=1)
    ledger = Ledger()
    for g, size in enumerate(sizes):
        funding = FundingKind.SPONSOR if sponsored[g] else FundingKind.OWNED
        ledger.lease(run, f"n{g}", size, group=g, funding=funding)
    ended = set(shrink_plan(run, ledger.leases, target))
    left = width(ledger.leases, run.key, ended)
    assert left >= min_gpus
    assert left >= min(target, total)
    # Whole groups only.
    for g in range(len(sizes)):
        names = {lease.name for lease in ledger.leases if lease.group == g}
        assert names <= ended or not names & ended
