"""The eager cover: every offer priced on every call (the implementation before issue 14).

Kept only as a baseline: ``bench/bench_cover.py`` times it beside the lazy cover in the same run,
and ``tests/unit/engine/test_cover_lazy.py`` checks the lazy cover gives its answers (the same
allocation, the same typed refusals) on generated trees, budgets and usage. Production code never
imports it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from types import MappingProxyType

from shared.engine.accounting import ZERO, Usage
from shared.engine.cover import (
    _HOUR,
    BORROW_CAP,
    CoverDenied,
    _greedy,
    _is_borrow_cap,
    _split,
    agg_cap_key,
    cap_limit,
    cover_demand,
    gpus_for_hours,
    hours_left,
    invalid_reason,
    lend_cap_key,
    lend_limit,
    lends_to,
    requested_locations,
    window_allows,
)
from shared.engine.family import Family, Keyed
from shared.engine.model import CoverFailure, Envelope, FundingKind, RunRequest
from shared.engine.offers import Funding, Offer


def eager_cover(
    request: RunRequest,
    family: Family,
    usage: Usage,
    *,
    now: datetime,
    demand: int | None = None,
    default_duration: timedelta = timedelta(hours=24),
    for_reservation: bool = False,
    already_borrowed: int = 0,
) -> Funding | CoverDenied:
    """Fund ``demand`` (default: active GPUs + spares) in SPEC §3 order, or say why not.

    GPU-hours headroom prices every demanded GPU at the full rate for the expected duration
    (``maxDuration``, else ``default_duration``): cover cannot know which GPUs pack will make
    spares, so spares are priced conservatively at the full rate (``usage`` already applies the
    spare factor to what was consumed). ``already_borrowed`` is what the Run
    borrows today (a grow must stay within maxBorrowGPUs in total).
    """
    problem = invalid_reason(request, demand)
    if problem is not None:
        return CoverDenied(CoverFailure.INVALID_REQUEST, f"InvalidRequest: {problem}", 0)
    if default_duration <= timedelta(0):
        raise ValueError("default_duration must be positive")
    need = cover_demand(request) if demand is None else demand
    hours = (request.max_duration or default_duration) / _HOUR
    default_hours = default_duration / _HOUR
    owner, flavor = request.owner, request.flavor

    cands = family.candidates(owner, flavor)
    locations = requested_locations(request, [e for _, e in cands.own])
    own_in, own_out = _split(cands.own, locations)
    sibs_in, sibs_out = _split(cands.siblings, locations)
    pars_in, pars_out = _split(cands.parents, locations)
    cous_in, cous_out = _split(cands.cousins, locations)
    owned, fam_kind, sponsor = FundingKind.OWNED, FundingKind.FAMILY, FundingKind.SPONSOR
    ordered: list[tuple[str, Envelope, FundingKind]] = [(k, e, owned) for k, e in own_in]
    ordered += [(k, e, fam_kind) for k, e in (*sibs_in, *pars_in)]
    ordered += [(k, e, owned) for k, e in own_out]
    ordered += [(k, e, fam_kind) for k, e in (*sibs_out, *pars_out, *cous_in, *cous_out)]

    sponsor_count = acl_allowed = 0
    if request.allow_borrow and request.sponsors:
        spons: Keyed = tuple(
            kv
            for s in dict.fromkeys(request.sponsors)
            if not family.is_family(owner, s)
            for kv in family.flavored(s, flavor)
        )
        spon_in, spon_out = _split(spons, locations)
        ordered += [(k, e, sponsor) for k, e in (*spon_in, *spon_out)]
        sponsor_count = len(spons)
        acl_allowed = sum(1 for _, e in spons if lends_to(e, owner))

    if not ordered:
        hint = (
            " (sponsors are ignored: allowBorrow is false)"
            if request.sponsors and not request.allow_borrow
            else ""
        )
        return CoverDenied(
            CoverFailure.NO_ENVELOPE,
            f"NoEnvelope: no {flavor} envelope in the family of {owner}"
            f" or among its {len(request.sponsors)} sponsor(s){hint}; need {need} GPUs",
            need,
            demand=need,
        )

    env_usage = usage.envelopes
    caps: dict[str, int] = {}
    offers: list[Offer] = []  # every offer with own headroom, for the BorrowLimit diagnosis
    usable: list[Offer] = []  # ...and those whose shared caps are not exhausted
    in_window = 0
    borrow_left = (
        None
        if request.max_borrow_gpus is None
        else max(0, request.max_borrow_gpus - already_borrowed)
    )
    for key, env, kind in ordered:
        if not window_allows(env, now, for_reservation=for_reservation):
            continue
        in_window += 1
        if kind is sponsor and not lends_to(env, owner):
            continue
        eu = env_usage.get(key)
        used = ZERO if eu is None else eu.total
        gpus = env.concurrency - used.gpus
        if env.max_gpu_hours is not None and gpus > 0:
            left = hours_left(env.max_gpu_hours, used, default_hours)
            gpus = min(gpus, gpus_for_hours(left, hours))
        if gpus <= 0:
            continue
        keys: list[str] = []
        ok = True
        for cap in family.caps_for(key):
            ck = agg_cap_key(cap.key)
            left_gpus = caps.get(ck)
            if left_gpus is None:
                left_gpus = caps[ck] = cap_limit(cap, usage, hours, default_hours)
            ok = ok and left_gpus > 0
            keys.append(ck)
        if kind is sponsor:
            lend = lend_limit(env, usage, hours, default_hours)
            if lend is not None:
                ck = lend_cap_key(key)
                caps[ck] = lend
                keys.append(ck)
                ok = ok and lend > 0
            if borrow_left is not None:
                caps[BORROW_CAP] = borrow_left
                keys.append(BORROW_CAP)
                ok = ok and borrow_left > 0
        offer = Offer(envelope=env, gpus=gpus, kind=kind, caps=tuple(keys))
        offers.append(offer)
        if ok:
            usable.append(offer)

    where = f"{flavor} envelope(s) for {owner}"
    if not in_window:
        return CoverDenied(
            CoverFailure.NO_ENVELOPE,
            f"NoEnvelope: all {len(ordered)} {where} are outside their time window at "
            f"{now.isoformat()}; need {need} GPUs",
            need,
            demand=need,
        )

    frozen_caps = MappingProxyType(caps)
    taken = _greedy(usable, caps, need)
    funded = sum(t for _, t in taken)
    if funded >= need:
        return Funding(offers=tuple(usable), caps=frozen_caps)

    short = need - funded
    kind_of = {o.envelope.key: o.kind for o in usable}
    by_kind = {k: 0 for k in FundingKind}
    for key, take in taken:
        by_kind[kind_of[key]] += take
    split = f"owned {by_kind[owned]}, family {by_kind[fam_kind]}, sponsor {by_kind[sponsor]}"
    head = f"{owner} needs {need} {flavor} GPUs, {funded} fundable now ({split})"
    shown = tuple(usable)

    relaxed = sum(t for _, t in _greedy(offers, caps, need, ignore=_is_borrow_cap))
    if relaxed >= need:
        limits = []
        if request.max_borrow_gpus is not None:
            limits.append(
                f"maxBorrowGPUs {request.max_borrow_gpus}"
                + (f" ({already_borrowed} already borrowed)" if already_borrowed else "")
            )
        lend_left = {k: v for k, v in caps.items() if k.startswith("lend:")}
        if lend_left:
            limits.append(
                "lending sub-caps left "
                + ", ".join(f"{k.removeprefix('lend:')}={v}" for k, v in sorted(lend_left.items()))
            )
        return CoverDenied(
            CoverFailure.BORROW_LIMIT,
            f"BorrowLimit: {head}; sponsors could fund {relaxed} but only within "
            f"{' and '.join(limits)}; short by {short}",
            short,
            shown,
            need,
            frozen_caps,
        )
    if sponsor_count and acl_allowed == 0:
        return CoverDenied(
            CoverFailure.ACL_DENIED,
            f"ACLDenied: {head}; all {sponsor_count} {flavor} envelope(s) of sponsors "
            f"{', '.join(dict.fromkeys(request.sponsors))} refuse to lend to {owner}; "
            f"short by {short}",
            short,
            shown,
            need,
            frozen_caps,
        )
    skipped = len(ordered) - in_window
    note = f"; {skipped} envelope(s) outside their window" if skipped else ""
    borrow = "" if request.allow_borrow else "; borrowing not allowed (allowBorrow false)"
    return CoverDenied(
        CoverFailure.INSUFFICIENT_CAPACITY,
        f"InsufficientCapacity: {head} from {len(usable)} of {len(ordered)} {where}; "
        f"short by {short}{note}{borrow}",
        short,
        shown,
        need,
        frozen_caps,
    )
