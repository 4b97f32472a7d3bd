"""Cover: order, location, windows, headroom, caps, lending, typed failures, cap property."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.accounting import Usage, usage_from_ledger
from shared.engine.cover import (
    BORROW_CAP,
    CoverDenied,
    allocate,
    compatible,
    cover,
    cover_demand,
    group_count,
)
from shared.engine.family import Family
from shared.engine.model import (
    Budget,
    CoverFailure,
    Envelope,
    FundingKind,
    Lease,
    Lending,
    Malleable,
    Role,
)
from shared.engine.offers import Funding
from tests.unit.engine.budgets import (
    A100,
    EAST,
    T0,
    WEST,
    budget,
    cap,
    env,
    key,
    lease,
    lending,
    loc,
    request,
    root,
)

H = timedelta(hours=1)


def empty(now: datetime = T0) -> Usage:
    return usage_from_ledger([], now=now)


def funded(result: Funding | CoverDenied) -> Funding:
    assert isinstance(result, Funding), result
    return result


def denied(result: Funding | CoverDenied, reason: CoverFailure) -> CoverDenied:
    assert isinstance(result, CoverDenied), result
    assert result.reason is reason, result.message
    return result


def keys(f: Funding | CoverDenied) -> list[str]:
    return [o.envelope.key for o in f.offers]


# -- order ----------------------------------------------------------------------------------------

ME = "org:ai:rai:sys"


def _six_step_family() -> Family:
    def two(owner: str) -> Budget:
        return budget(owner, env("east", 8, selector=EAST), env("west", 8, selector=WEST))

    return Family(
        [
            two(ME),
            two("org:ai:rai:ml"),  # sibling
            two("org:ai:rai"),  # parent
            two("org:ai"),  # grandparent
            two("org:ai:vision"),  # cousin
            two(f"{ME}:kid"),  # descendant: comes with cousins
            budget("ext:lab", env("east", 8, selector=EAST, lend=lending("org:*"))),
            budget("ext:far", env("west", 8, selector=WEST, lend=lending("org:*"))),
        ]
    )


def test_six_steps_in_order_with_requested_location() -> None:
    fam = _six_step_family()
    req = request(ME, 8, selector=EAST, allow_borrow=True, sponsors=["ext:far", "ext:lab"])
    f = funded(cover(req, fam, empty(), now=T0, complete=True))
    k = {o: key(o, "east") for o in (ME, "org:ai:rai:ml", "org:ai:rai", "org:ai")}
    w = {o: key(o, "west") for o in (ME, "org:ai:rai:ml", "org:ai:rai", "org:ai")}
    assert keys(f) == [
        k[ME],  # 1 owner in location
        k["org:ai:rai:ml"],  # 2 siblings in location
        k["org:ai:rai"],  # 3 parents in location, nearest first
        k["org:ai"],
        w[ME],  # 4 owner, siblings, parents elsewhere
        w["org:ai:rai:ml"],
        w["org:ai:rai"],
        w["org:ai"],
        key(f"{ME}:kid", "east"),  # 5 cousins (descendants first) in location…
        key("org:ai:vision", "east"),
        key(f"{ME}:kid", "west"),  # …then elsewhere
        key("org:ai:vision", "west"),
        "ext-lab/east",  # 6 sponsors in location first, regardless of listing order
        "ext-far/west",
    ]
    kinds = [o.kind for o in f.offers]
    assert kinds[0] is FundingKind.OWNED and kinds[4] is FundingKind.OWNED
    assert {kinds[i] for i in (1, 2, 3, 5, 6, 7, 8, 9, 10, 11)} == {FundingKind.FAMILY}
    assert kinds[12:] == [FundingKind.SPONSOR, FundingKind.SPONSOR]


def test_default_location_is_owner_envelopes_in_order() -> None:
    fam = Family(
        [
            budget(ME, env("w", 4, selector=WEST), env("e", 4, selector=EAST)),
            budget("org:ai:rai:ml", env("e", 4, selector=EAST), env("w", 4, selector=WEST)),
            budget("org:ai:rai:x", env("eu", 4, selector=loc("eu-west"))),
            root("org:ai:rai"),
        ]
    )
    f = funded(cover(request(ME, 4), fam, empty(), now=T0, complete=True))
    # siblings: WEST (owner's first location) before EAST; eu-west is elsewhere (step 4).
    assert keys(f) == [
        key(ME, "w"),
        key(ME, "e"),
        key("org:ai:rai:ml", "w"),
        key("org:ai:rai:ml", "e"),
        key("org:ai:rai:x", "eu"),
    ]


def test_cover_stops_pricing_once_the_demand_is_funded() -> None:
    fam = Family(
        [
            budget(ME, env("w", 4, selector=WEST), env("e", 4, selector=EAST)),
            budget("org:ai:rai:ml", env("e", 4, selector=EAST)),
            root("org:ai:rai"),
        ]
    )
    lazy = funded(cover(request(ME, 6), fam, empty(), now=T0))
    assert keys(lazy) == [key(ME, "w"), key(ME, "e")] and not lazy.complete
    whole = funded(cover(request(ME, 6), fam, empty(), now=T0, complete=True))
    assert keys(whole) == [key(ME, "w"), key(ME, "e"), key("org:ai:rai:ml", "e")]
    assert whole.complete and allocate(lazy, 6) == allocate(whole, 6)
    # The last offer funds it: nothing was left unpriced.
    assert funded(cover(request(ME, 12), fam, empty(), now=T0)).complete
    # A rack-level payer makes pack's node sets depend on every offer: cover lists them all.
    racked = fam.updated([budget("org:ai:rai:ml", env("e", 4, selector={**EAST, "rack": "r1"}))])
    assert funded(cover(request(ME, 6), racked, empty(), now=T0)).complete


def test_owner_without_envelopes_takes_family_anywhere() -> None:
    fam = Family(
        [budget(ME, env("a", 4, flavor=A100)), budget("org:ai:rai", env("w", 4, selector=WEST))]
    )
    f = funded(cover(request(ME, 4), fam, empty(), now=T0))
    assert keys(f) == [key("org:ai:rai", "w")]
    assert f.offers[0].kind is FundingKind.FAMILY


def test_location_compatibility_compares_shared_keys_only() -> None:
    assert compatible({"region": "us-east"}, {"region": "us-east", "cluster": "c1"})
    assert compatible({"region": "us-east", "cluster": "c9"}, {"region": "us-east"})
    assert not compatible({"region": "us-east", "cluster": "c9"}, {"cluster": "c1"})
    assert compatible({"rack": "r1"}, {"region": "us-east"})


def test_only_the_run_flavor_pays() -> None:
    fam = Family([budget(ME, env("a", 8, flavor=A100), env("h", 8))])
    f = funded(cover(request(ME, 8), fam, empty(), now=T0))
    assert keys(f) == [key(ME, "h")]
    d = denied(
        cover(request(ME, 8, flavor="MI300"), fam, empty(), now=T0), CoverFailure.NO_ENVELOPE
    )
    assert "MI300" in d.message


def test_family_sharing_needs_no_allow_borrow() -> None:
    fam = Family(
        [budget(ME, env("e", 4)), budget("org:ai:rai:ml", env("e", 8)), root("org:ai:rai")]
    )
    f = funded(cover(request(ME, 12), fam, empty(), now=T0))
    assert allocate(f, 12) == ((key(ME, "e"), 4), (key("org:ai:rai:ml", "e"), 8))


def test_sponsor_who_is_family_is_used_as_family_without_acl() -> None:
    fam = Family(
        [
            budget(ME, env("e", 4)),
            budget("org:ai:rai:ml", env("e", 8, lend=Lending())),
            root("org:ai:rai"),
        ]
    )
    req = request(ME, 12, allow_borrow=True, sponsors=["org:ai:rai:ml"])
    f = funded(cover(req, fam, empty(), now=T0))
    assert [(o.envelope.key, o.kind) for o in f.offers] == [
        (key(ME, "e"), FundingKind.OWNED),
        (key("org:ai:rai:ml", "e"), FundingKind.FAMILY),
    ]
    assert BORROW_CAP not in f.caps


# -- windows --------------------------------------------------------------------------------------


def _windowed(**kw: Any) -> Family:
    return Family([budget(ME, env("e", 8, start=T0 + H, end=T0 + 5 * H, **kw))])


def test_window_closed_after_end_and_before_start() -> None:
    fam = _windowed()
    denied(cover(request(ME, 4), fam, empty(), now=T0), CoverFailure.NO_ENVELOPE)
    funded(cover(request(ME, 4), fam, empty(), now=T0 + H))
    d = denied(cover(request(ME, 4), fam, empty(), now=T0 + 5 * H), CoverFailure.NO_ENVELOPE)
    assert "outside their time window" in d.message


def test_pre_activation_reservations_only_for_reservations() -> None:
    fam = _windowed(reservations_before_start=True)
    denied(cover(request(ME, 4), fam, empty(), now=T0), CoverFailure.NO_ENVELOPE)
    funded(cover(request(ME, 4), fam, empty(), now=T0, for_reservation=True))


def test_pre_activation_admission_allows_binding_and_reserving() -> None:
    fam = _windowed(admission_before_start=True)
    funded(cover(request(ME, 4), fam, empty(), now=T0))
    funded(cover(request(ME, 4), fam, empty(), now=T0, for_reservation=True))


# -- headroom -------------------------------------------------------------------------------------


def test_concurrency_headroom_subtracts_live_leases() -> None:
    fam = Family([budget(ME, env("e", 16))])
    u = usage_from_ledger([lease("l", key(ME, "e"), 10, T0)], now=T0)
    f = funded(cover(request(ME, 6), fam, u, now=T0))
    assert f.offers[0].gpus == 6
    d = denied(cover(request(ME, 7), fam, u, now=T0), CoverFailure.INSUFFICIENT_CAPACITY)
    assert d.shortfall == 1
    assert "needs 7" in d.message and "6 fundable" in d.message


def test_gpu_hours_headroom_uses_expected_duration() -> None:
    fam = Family([budget(ME, env("e", 64, max_gpu_hours=100))])
    u = usage_from_ledger([lease("l", key(ME, "e"), 2, T0, end=T0 + 10 * H)], now=T0 + 10 * H)
    # 80 GPU-hours left: 10 h runs get 8 GPUs, 4 h runs get 20.
    f10 = funded(cover(request(ME, 8, max_duration=10 * H), fam, u, now=T0 + 10 * H))
    assert f10.offers[0].gpus == 8
    f4 = funded(cover(request(ME, 8, max_duration=4 * H), fam, u, now=T0 + 10 * H))
    assert f4.offers[0].gpus == 20
    # no maxDuration: the configured default applies
    d = cover(request(ME, 8), fam, u, now=T0 + 10 * H, default_duration=20 * H)
    assert denied(d, CoverFailure.INSUFFICIENT_CAPACITY).shortfall == 4


def test_gpu_hours_promised_to_open_leases_are_not_offered_twice() -> None:
    fam = Family([budget(ME, env("e", 64, max_gpu_hours=100))])
    open_lease = lease("l", key(ME, "e"), 5, T0, expected_end=T0 + 10 * H)
    u = usage_from_ledger([open_lease], now=T0 + 2 * H)
    # 10 consumed + 40 still committed: 50 left → 5 GPUs for 10 h
    f = funded(cover(request(ME, 5, max_duration=10 * H), fam, u, now=T0 + 2 * H))
    assert f.offers[0].gpus == 5
    # a lease with no expected end is assumed to run one default duration more
    fam = Family([budget(ME, env("e", 200, max_gpu_hours=100))])
    u2 = usage_from_ledger([lease("l", key(ME, "e"), 2, T0)], now=T0 + H)
    f2 = funded(cover(request(ME, 1, max_duration=H), fam, u2, now=T0 + H, default_duration=10 * H))
    assert f2.offers[0].gpus == 100 - 2 - 2 * 10  # consumed 2, 2 GPUs × 10 h assumed


def test_envelope_with_no_headroom_is_skipped() -> None:
    fam = Family([budget(ME, env("a", 4), env("b", 4))])
    u = usage_from_ledger([lease("l", key(ME, "a"), 4, T0)], now=T0)
    assert keys(funded(cover(request(ME, 4), fam, u, now=T0))) == [key(ME, "b")]


# -- aggregate caps -------------------------------------------------------------------------------


def test_aggregate_cap_bounds_envelopes_together() -> None:
    b = budget(ME, env("a", 8), env("b", 8), caps=[cap("both", ["a", "b"], max_concurrency=10)])
    fam = Family([b])
    f = funded(cover(request(ME, 10), fam, empty(), now=T0))
    assert [o.gpus for o in f.offers] == [8, 8]
    assert all(o.caps == (f"agg:{key(ME, 'both')}",) for o in f.offers)
    assert f.caps[f"agg:{key(ME, 'both')}"] == 10
    assert allocate(f, 10) == ((key(ME, "a"), 8), (key(ME, "b"), 2))
    d = denied(cover(request(ME, 12), fam, empty(), now=T0), CoverFailure.INSUFFICIENT_CAPACITY)
    assert d.shortfall == 2


def test_aggregate_cap_gpu_hours_and_usage() -> None:
    b = budget(ME, env("a", 8), env("b", 8), caps=[cap("h", ["a", "b"], max_gpu_hours=30)])
    fam = Family([b])
    u = usage_from_ledger([lease("l", key(ME, "a"), 2, T0, end=T0 + 5 * H)], b.caps, now=T0 + 5 * H)
    f = funded(cover(request(ME, 2, max_duration=10 * H), fam, u, now=T0 + 5 * H))
    assert f.caps[f"agg:{key(ME, 'h')}"] == 2
    denied(
        cover(request(ME, 3, max_duration=10 * H), fam, u, now=T0 + 5 * H),
        CoverFailure.INSUFFICIENT_CAPACITY,
    )


def test_exhausted_aggregate_cap_hides_its_offers() -> None:
    b = budget(ME, env("a", 8), caps=[cap("c", ["a"], max_concurrency=2)])
    fam = Family([b, budget("org:ai:rai:ml", env("e", 8)), root("org:ai:rai")])
    u = usage_from_ledger([lease("l", key(ME, "a"), 2, T0)], b.caps, now=T0)
    f = funded(cover(request(ME, 4), fam, u, now=T0))
    assert keys(f) == [key("org:ai:rai:ml", "e")]


# -- sponsors -------------------------------------------------------------------------------------


def _with_sponsor(lend: Lending, *, own: int = 96, theirs: int = 64) -> Family:
    return Family([budget(ME, env("e", own)), budget("ext:lab", env("e", theirs, lend=lend))])


def test_acl_globs_match_borrower() -> None:
    for glob in ("org:ai:*", "org:ai:rai:sys", "org:*:sys", "*"):
        fam = _with_sponsor(lending("other:*", glob))
        req = request(ME, 128, allow_borrow=True, sponsors=["ext:lab"])
        f = funded(cover(req, fam, empty(), now=T0))
        assert allocate(f, 128)[-1] == ("ext-lab/e", 32)


@pytest.mark.parametrize(
    "lend",
    [
        lending("org:fin:*"),
        Lending(allow=False, to=("*",)),
        Lending(allow=True, to=()),
        lending("ORG:AI:*"),  # globs are case-sensitive
    ],
)
def test_acl_refusal_is_typed(lend: Lending) -> None:
    fam = _with_sponsor(lend)
    req = request(ME, 128, allow_borrow=True, sponsors=["ext:lab"])
    d = denied(cover(req, fam, empty(), now=T0), CoverFailure.ACL_DENIED)
    assert d.shortfall == 32
    assert "ext:lab" in d.message and "refuse" in d.message


def test_sponsors_need_allow_borrow() -> None:
    fam = _with_sponsor(lending("*"))
    d = denied(
        cover(request(ME, 128, sponsors=["ext:lab"]), fam, empty(), now=T0),
        CoverFailure.INSUFFICIENT_CAPACITY,
    )
    assert "allowBorrow false" in d.message
    lonely = Family([budget("ext:lab", env("e", 64, lend=lending("*")))])
    d2 = denied(
        cover(request(ME, 8, sponsors=["ext:lab"]), lonely, empty(), now=T0),
        CoverFailure.NO_ENVELOPE,
    )
    assert "allowBorrow is false" in d2.message


def test_max_borrow_gpus_is_a_shared_cap() -> None:
    fam = Family(
        [
            budget(ME, env("e", 96)),
            budget("ext:a", env("e", 16, lend=lending("*"))),
            budget("ext:b", env("e", 16, lend=lending("*"))),
        ]
    )
    req = request(ME, 120, allow_borrow=True, max_borrow=24, sponsors=["ext:a", "ext:b"])
    f = funded(cover(req, fam, empty(), now=T0))
    assert f.caps[BORROW_CAP] == 24
    assert allocate(f, 120) == ((key(ME, "e"), 96), ("ext-a/e", 16), ("ext-b/e", 8))
    d = denied(
        cover(
            request(ME, 128, allow_borrow=True, max_borrow=24, sponsors=["ext:a", "ext:b"]),
            fam,
            empty(),
            now=T0,
        ),
        CoverFailure.BORROW_LIMIT,
    )
    assert d.shortfall == 8 and "maxBorrowGPUs 24" in d.message
    # a grow must count what the run already borrows
    d2 = denied(cover(req, fam, empty(), now=T0, already_borrowed=20), CoverFailure.BORROW_LIMIT)
    assert d2.shortfall == 20 and "20 already borrowed" in d2.message


def test_lending_sub_caps_minus_what_is_already_lent() -> None:
    fam = _with_sponsor(lending("*", max_concurrency=40))
    u = usage_from_ledger(
        [
            lease(
                "x",
                "ext-lab/e",
                16,
                T0,
                funding=FundingKind.SPONSOR,
                owner="org:zz",
                payer_owner="ext:lab",
            )
        ],
        now=T0,
    )
    req = request(ME, 120, allow_borrow=True, sponsors=["ext:lab"])
    f = funded(cover(req, fam, u, now=T0))
    assert f.caps["lend:ext-lab/e"] == 24
    d = denied(
        cover(request(ME, 128, allow_borrow=True, sponsors=["ext:lab"]), fam, u, now=T0),
        CoverFailure.BORROW_LIMIT,
    )
    assert "ext-lab/e=24" in d.message and d.shortfall == 8


def test_lending_gpu_hours_sub_cap() -> None:
    fam = _with_sponsor(lending("*", max_gpu_hours=100))
    # 100 lendable GPU-hours: 10 GPUs for 10 h on top of the owner's 96
    req = request(ME, 107, allow_borrow=True, sponsors=["ext:lab"], max_duration=10 * H)
    d = denied(cover(req, fam, empty(), now=T0), CoverFailure.BORROW_LIMIT)
    assert d.shortfall == 1
    funded(
        cover(
            request(ME, 107, allow_borrow=True, sponsors=["ext:lab"], max_duration=5 * H),
            fam,
            empty(),
            now=T0,
        )
    )


def test_family_cannot_lend_to_itself_twice_owner_as_sponsor_is_ignored() -> None:
    fam = Family([budget(ME, env("e", 8, lend=lending("*")))])
    f = funded(cover(request(ME, 8, allow_borrow=True, sponsors=[ME]), fam, empty(), now=T0))
    assert [o.kind for o in f.offers] == [FundingKind.OWNED]


# -- typed failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "total", "needle"),
    [
        ({}, 0, "totalGPUs"),
        ({"flavor": ""}, 8, "gpuType"),
        ({"group_gpus": 0}, 8, "groupGPUs"),
        ({"spares": -1}, 8, "sparesPerGroup"),
        ({"max_borrow": 0}, 8, "maxBorrowGPUs"),
        ({"max_duration": timedelta(0)}, 8, "maxDuration"),
        ({"malleable": Malleable(16, 8, 8, 8)}, 8, "exceeds"),
        ({"malleable": Malleable(8, 32, 8, 32)}, 12, "not aligned"),
        ({"malleable": Malleable(8, 32, 8, 40)}, 16, "outside"),
        ({"malleable": Malleable(8, 32, 0, 32)}, 16, "stepGPUs"),
    ],
)
def test_invalid_requests(kwargs: dict[str, Any], total: int, needle: str) -> None:
    fam = Family([budget(ME, env("e", 64))])
    d = denied(
        cover(request(ME, total, **kwargs), fam, empty(), now=T0), CoverFailure.INVALID_REQUEST
    )
    assert needle in d.message
    assert d.shortfall == 0


def test_invalid_explicit_demand_and_owner() -> None:
    fam = Family([budget(ME, env("e", 64))])
    denied(cover(request(ME, 8), fam, empty(), now=T0, demand=0), CoverFailure.INVALID_REQUEST)
    denied(cover(request("", 8), fam, empty(), now=T0), CoverFailure.INVALID_REQUEST)
    with pytest.raises(ValueError):
        cover(request(ME, 8), fam, empty(), now=T0, default_duration=timedelta(0))


def test_no_envelope_in_an_unrelated_tree() -> None:
    fam = Family([budget("other:x", env("e", 64))])
    d = denied(cover(request(ME, 8), fam, empty(), now=T0), CoverFailure.NO_ENVELOPE)
    assert d.shortfall == 8 and d.demand == 8


def test_insufficient_capacity_message_has_numbers() -> None:
    fam = Family(
        [budget(ME, env("e", 64)), budget("org:ai:rai:ml", env("e", 32)), root("org:ai:rai")]
    )
    d = denied(cover(request(ME, 128), fam, empty(), now=T0), CoverFailure.INSUFFICIENT_CAPACITY)
    assert d.shortfall == 32
    assert "owned 64, family 32" in d.message
    assert len(d.offers) == 2


# -- demand ---------------------------------------------------------------------------------------


def test_demand_counts_spares_per_group() -> None:
    assert cover_demand(request(ME, 32, group_gpus=8, spares=1)) == 36
    assert cover_demand(request(ME, 30, group_gpus=8, spares=2)) == 38  # last group smaller
    assert group_count(request(ME, 32, malleable=Malleable(16, 64, 16, 64))) == 2


def test_spares_need_groups() -> None:
    fam = Family([budget(ME, env("e", 64))])
    refused = denied(
        cover(request(ME, 32, spares=4), fam, empty(), now=T0), CoverFailure.INVALID_REQUEST
    )
    assert "groupGPUs" in refused.message


def test_explicit_demand_overrides() -> None:
    fam = Family([budget(ME, env("e", 8))])
    funded(cover(request(ME, 64), fam, empty(), now=T0, demand=8))
    denied(
        cover(request(ME, 4, group_gpus=4, spares=8), fam, empty(), now=T0),
        CoverFailure.INSUFFICIENT_CAPACITY,
    )


def test_allocate_partial_when_short() -> None:
    fam = Family([budget(ME, env("e", 8))])
    f = funded(cover(request(ME, 8), fam, empty(), now=T0))
    assert allocate(f, 20) == ((key(ME, "e"), 8),)
    assert allocate(f, 3) == ((key(ME, "e"), 3),)


def test_cover_is_deterministic() -> None:
    fam = _six_step_family()
    req = request(ME, 40, selector=EAST, allow_borrow=True, sponsors=["ext:far", "ext:lab"])
    assert cover(req, fam, empty(), now=T0) == cover(req, fam, empty(), now=T0)


# -- property: admission never pushes an envelope past its limits -------------------------------

OWNERS = ("org:a:x", "org:a:y", "org:a", "org:b", "ext:s")


@dataclass
class _Open:
    lease: Lease
    end: datetime


@st.composite
def _families(draw: st.DrawFn) -> Family:
    def maybe_hours() -> float | None:
        return draw(st.one_of(st.none(), st.integers(0, 400).map(float)))

    budgets = []
    for owner in OWNERS:
        envs = []
        for i in range(draw(st.integers(1, 2))):
            lend = None
            if owner == "ext:s" or draw(st.booleans()):
                lend = Lending(
                    allow=True,
                    to=(draw(st.sampled_from(("org:*", "org:a:*", "nobody"))),),
                    max_concurrency=draw(st.one_of(st.none(), st.integers(0, 16))),
                    max_gpu_hours=maybe_hours(),
                )
            envs.append(
                env(
                    f"e{i}",
                    draw(st.integers(1, 24)),
                    selector=draw(st.sampled_from((EAST, WEST))),
                    max_gpu_hours=maybe_hours(),
                    lend=lend,
                )
            )
        caps = []
        if len(envs) == 2 and draw(st.booleans()):
            caps.append(
                cap(
                    "c",
                    ["e0", "e1"],
                    max_concurrency=draw(st.one_of(st.none(), st.integers(0, 30))),
                    max_gpu_hours=maybe_hours(),
                )
            )
        budgets.append(budget(owner, *envs, caps=caps))
    return Family(budgets)


def _future(opened: list[_Open], now: datetime, pick: Callable[[Lease], bool]) -> float:
    """GPU-hours the simulated open leases will still consume (the sim knows their real ends)."""
    return sum(o.lease.gpus * ((o.end - now) / H) for o in opened if pick(o.lease))


def _check_limits(fam: Family, usage: Usage, opened: list[_Open], now: datetime) -> None:
    eps = 1e-6
    for e in fam.all_envelopes():
        u = usage.envelope(e.key)
        k = e.key
        assert u.total.gpus <= e.concurrency
        if e.max_gpu_hours is not None:

            def paid_by(ls: Lease, k: str = k) -> bool:
                return ls.envelope == k

            future = _future(opened, now, paid_by)
            assert u.total.gpu_hours + future <= e.max_gpu_hours + eps
        if e.lending.max_concurrency is not None:
            assert u.lent.gpus <= e.lending.max_concurrency
        if e.lending.max_gpu_hours is not None:

            def lent_by(ls: Lease, k: str = k) -> bool:
                return ls.envelope == k and ls.funding is FundingKind.SPONSOR

            future = _future(opened, now, lent_by)
            assert u.lent.gpu_hours + future <= e.lending.max_gpu_hours + eps
    for c in fam.caps():
        cu = usage.cap(c.key)
        if c.max_concurrency is not None:
            assert cu.gpus <= c.max_concurrency
        if c.max_gpu_hours is not None:
            members = set(c.envelopes)

            def in_cap(ls: Lease, members: set[str] = members) -> bool:
                return ls.envelope in members

            assert cu.gpu_hours + _future(opened, now, in_cap) <= c.max_gpu_hours + eps


@settings(max_examples=150, deadline=None)
@given(_families(), st.data())
def test_property_admission_never_exceeds_limits(fam: Family, data: st.DataObject) -> None:
    default = 8 * H
    now = T0
    ledger: list[Lease] = []
    opened: list[_Open] = []
    for step in range(data.draw(st.integers(1, 25))):
        if data.draw(st.booleans()):
            now += timedelta(minutes=data.draw(st.integers(1, 600)))
            still = []
            for o in opened:
                if o.end <= now:
                    ledger[ledger.index(o.lease)] = replace(o.lease, end=o.end)
                else:
                    still.append(o)
            opened = still
        usage = usage_from_ledger(ledger, fam.caps(), now=now)
        _check_limits(fam, usage, opened, now)
        owner = data.draw(st.sampled_from(OWNERS[:-1]))
        dur = data.draw(st.one_of(st.none(), st.integers(1, 12).map(lambda h: h * H)))
        max_borrow = data.draw(st.one_of(st.none(), st.integers(1, 16)))
        req = request(
            owner,
            data.draw(st.integers(1, 24)),
            name=f"r{step}",
            selector=data.draw(st.sampled_from(({}, EAST, WEST))),
            allow_borrow=data.draw(st.booleans()),
            max_borrow=max_borrow,
            sponsors=["ext:s"],
            max_duration=dur,
        )
        result = cover(req, fam, usage, now=now, default_duration=default)
        if isinstance(result, CoverDenied):
            assert result.shortfall > 0
            continue
        need = cover_demand(req)
        taken = allocate(result, need)
        assert sum(g for _, g in taken) == need
        kinds = {o.envelope.key: o.kind for o in result.offers}
        borrowed = sum(g for k, g in taken if kinds[k] is FundingKind.SPONSOR)
        assert max_borrow is None or borrowed <= max_borrow
        for i, (k, g) in enumerate(taken):
            payer = fam.envelope(k)
            actual = data.draw(st.integers(1, int((dur or default) / timedelta(minutes=1))))
            ls = Lease(
                name=f"r{step}-{i}",
                run=req.key,
                owner=owner,
                node="n",
                gpus=g,
                role=Role.ACTIVE,
                group=0,
                rank=i,
                envelope=k,
                payer_owner=payer.owner,
                funding=kinds[k],
                start=now,
                expected_end=None if dur is None else now + dur,
            )
            ledger.append(ls)
            opened.append(_Open(ls, now + timedelta(minutes=actual)))
        usage = usage_from_ledger(ledger, fam.caps(), now=now)
        _check_limits(fam, usage, opened, now)


def test_helpers_build_expected_keys() -> None:
    b = budget(ME, env("e", 1))
    assert isinstance(b.envelopes[0], Envelope)
    assert b.envelopes[0].key == key(ME, "e")
