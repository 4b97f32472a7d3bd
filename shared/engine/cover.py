"""Cover — who pays (SPEC §3).

Cover turns a Run's demand into an ordered list of envelopes willing to pay (:class:`Offer`) plus
the shared limits those offers draw on, or a typed refusal. It decides *who* may pay and in which
order; pack decides *where* and consumes offers greedily (:func:`allocate` is that greedy rule in
its placement-free form). No numeric priorities: the order is structural.

Order, each step restricted to envelopes of the Run's flavor and skipping any already listed:

1. the owner's envelopes in the requested location;
2. siblings' in the location;  3. parents' (all ancestors, nearest first) in the location;
4. owner's, siblings', parents' in other locations;
5. cousins (descendants included, see :mod:`shared.engine.family`) in the location, then elsewhere;
6. sponsors named by the Run — only with ``allowBorrow``, only envelopes whose lending allows the
   borrower — in the location, then elsewhere. A sponsor who is family was used in its family step.

The requested location is ``request.selector`` when non-empty, else the selectors of the owner's
own envelopes of the flavor in their order (several locations: "in the location" steps list
envelopes by the first location they fit, then by step order), else anywhere. An envelope is *in*
a location when every label key both selectors name has the same value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from types import MappingProxyType

from shared.engine.accounting import ZERO, Meter, Usage
from shared.engine.family import Family, Keyed
from shared.engine.model import (
    AggregateCap,
    CoverFailure,
    Envelope,
    FundingKind,
    RunRequest,
    Selector,
)
from shared.engine.offers import Funding, Offer

_HOUR = timedelta(hours=1)
UNBOUNDED = 1 << 62
"""Stand-in for "no limit" in GPU counts (larger than any fleet)."""
BORROW_CAP = "borrow"
"""Shared cap key: the Run's maxBorrowGPUs across every sponsor offer."""
_EPS = 1e-9


def lend_cap_key(envelope_key: str) -> str:
    """Shared cap key of an envelope's lending sub-caps."""
    return f"lend:{envelope_key}"


def agg_cap_key(cap_key: str) -> str:
    """Shared cap key of an aggregate cap."""
    return f"agg:{cap_key}"


@dataclass(frozen=True, slots=True)
class CoverDenied:
    """Cover failed: a typed reason, a human message with numbers, and what was on offer."""

    reason: CoverFailure
    message: str
    shortfall: int
    """GPUs missing to fund the demand (0 for InvalidRequest)."""
    offers: tuple[Offer, ...] = ()
    demand: int = 0
    caps: Mapping[str, int] = field(default_factory=dict)


# -- demand and validation ------------------------------------------------------------------------


def group_count(request: RunRequest) -> int:
    """Groups as pack forms them: groupGPUs, else malleable stepGPUs, else one group.

    Node-granular runs (neither set) may not ask for spares (``invalid_reason``), so their count
    only matters as 1 here.
    """
    size = request.group_gpus or (request.malleable.step_gpus if request.malleable else None)
    if not size or size <= 0:
        return 1
    return max(1, math.ceil(request.total_gpus / size))


def cover_demand(request: RunRequest) -> int:
    """Active GPUs plus spares: what the whole gang needs funded."""
    return request.total_gpus + max(0, request.spares_per_group) * group_count(request)


def invalid_reason(request: RunRequest, demand: int | None = None) -> str | None:
    """Why a request cannot be covered at all, or None when it is well formed."""
    if not request.owner:
        return "spec.owner is empty"
    if not request.flavor:
        return "spec.resources.gpuType is empty"
    if request.total_gpus <= 0:
        return f"totalGPUs must be > 0 (got {request.total_gpus})"
    if request.group_gpus is not None and request.group_gpus <= 0:
        return f"groupGPUs must be > 0 (got {request.group_gpus})"
    if request.spares_per_group < 0:
        return f"sparesPerGroup must be ≥ 0 (got {request.spares_per_group})"
    if request.spares_per_group and not (request.group_gpus or request.malleable):
        return "sparesPerGroup needs groups: set spec.locality.groupGPUs (or spec.malleable)"
    if request.max_borrow_gpus is not None and request.max_borrow_gpus <= 0:
        return f"maxBorrowGPUs must be > 0 (got {request.max_borrow_gpus})"
    if request.max_duration is not None and request.max_duration <= timedelta(0):
        return f"maxDuration must be positive (got {request.max_duration})"
    if demand is not None and demand <= 0:
        return f"demand must be > 0 (got {demand})"
    m = request.malleable
    if m is not None:
        if m.step_gpus <= 0 or m.min_gpus <= 0:
            return f"malleable minTotalGPUs {m.min_gpus} and stepGPUs {m.step_gpus} must be > 0"
        if m.min_gpus > m.max_gpus:
            return f"malleable minTotalGPUs {m.min_gpus} exceeds maxTotalGPUs {m.max_gpus}"
        for label, value in (("totalGPUs", request.total_gpus), ("desired", m.desired_gpus)):
            if not m.min_gpus <= value <= m.max_gpus:
                return f"{label} {value} outside malleable bounds [{m.min_gpus}, {m.max_gpus}]"
            if (value - m.min_gpus) % m.step_gpus:
                return (
                    f"{label} {value} not aligned to stepGPUs {m.step_gpus} "
                    f"from minTotalGPUs {m.min_gpus}"
                )
    return None


# -- locations, windows, limits -------------------------------------------------------------------


def compatible(envelope_selector: Selector, location: Selector) -> bool:
    """True when every label key both selectors name has the same value."""
    for k, v in envelope_selector.items():
        other = location.get(k)
        if other is not None and other != v:
            return False
    return True


def requested_locations(request: RunRequest, own: Sequence[Envelope]) -> tuple[Selector, ...]:
    """The Run's selector, else its owner's envelope selectors in order, else anywhere."""
    if request.selector:
        return (request.selector,)
    seen: dict[tuple[tuple[str, str], ...], Selector] = {}
    for env in own:
        seen.setdefault(tuple(sorted(env.selector.items())), env.selector)
    return tuple(seen.values()) or ({},)


def window_allows(envelope: Envelope, now: datetime, *, for_reservation: bool = False) -> bool:
    """Inside [start, end), or before start when preActivation allows it.

    Admission before start also allows a reservation (binding is the stronger promise).
    """
    if envelope.end is not None and now >= envelope.end:
        return False
    if envelope.start is not None and now < envelope.start:
        return envelope.admission_before_start or (
            for_reservation and envelope.reservations_before_start
        )
    return True


def gpus_for_hours(remaining_gpu_hours: float, hours: float) -> int:
    """How many GPUs fit into remaining GPU-hours for ``hours`` each (never negative)."""
    if hours <= 0:
        return UNBOUNDED if remaining_gpu_hours >= 0 else 0
    return max(0, math.floor(remaining_gpu_hours / hours + _EPS))


def hours_left(limit: float, used: Meter, default_hours: float) -> float:
    """GPU-hours not consumed nor promised to open leases (unbounded ones: one default more)."""
    return limit - used.gpu_hours - used.committed_gpu_hours - used.unbounded_gpus * default_hours


def envelope_limit(envelope: Envelope, usage: Usage, hours: float, default_hours: float) -> int:
    """GPUs the envelope itself can still pay: concurrency and GPU-hours headroom."""
    used = usage.envelope(envelope.key).total
    gpus = envelope.concurrency - used.gpus
    if envelope.max_gpu_hours is not None:
        left = hours_left(envelope.max_gpu_hours, used, default_hours)
        gpus = min(gpus, gpus_for_hours(left, hours))
    return max(0, gpus)


def cap_limit(cap: AggregateCap, usage: Usage, hours: float, default_hours: float) -> int:
    """GPUs an aggregate cap still admits across its envelopes."""
    used = usage.cap(cap.key)
    gpus = UNBOUNDED
    if cap.max_concurrency is not None:
        gpus = cap.max_concurrency - used.gpus
    if cap.max_gpu_hours is not None:
        left = hours_left(cap.max_gpu_hours, used, default_hours)
        gpus = min(gpus, gpus_for_hours(left, hours))
    return max(0, gpus)


def lend_limit(envelope: Envelope, usage: Usage, hours: float, default_hours: float) -> int | None:
    """GPUs the envelope may still lend under its lending sub-caps; None when unbounded."""
    lending = envelope.lending
    if lending.max_concurrency is None and lending.max_gpu_hours is None:
        return None
    lent = usage.envelope(envelope.key).lent
    gpus = UNBOUNDED
    if lending.max_concurrency is not None:
        gpus = lending.max_concurrency - lent.gpus
    if lending.max_gpu_hours is not None:
        left = hours_left(lending.max_gpu_hours, lent, default_hours)
        gpus = min(gpus, gpus_for_hours(left, hours))
    return max(0, gpus)


def lends_to(envelope: Envelope, borrower: str) -> bool:
    """Lending ACL: allowed and some ``to`` glob matches the borrower (empty ``to``: nobody)."""
    lending = envelope.lending
    return lending.allow and any(fnmatchcase(borrower, glob) for glob in lending.to)


# -- greedy consumption ---------------------------------------------------------------------------


def _greedy(
    offers: Sequence[Offer],
    caps: Mapping[str, int],
    demand: int,
    ignore: Callable[[str], bool] | None = None,
) -> list[tuple[str, int]]:
    remaining = dict(caps)
    left = demand
    taken: list[tuple[str, int]] = []
    for offer in offers:
        if left <= 0:
            break
        take = min(offer.gpus, left)
        for k in offer.caps:
            if k in remaining and not (ignore is not None and ignore(k)):
                take = min(take, remaining[k])
        if take <= 0:
            continue
        for k in offer.caps:
            if k in remaining:
                remaining[k] -= take
        left -= take
        taken.append((offer.envelope.key, take))
    return taken


def allocate(funding: Funding, demand: int) -> tuple[tuple[str, int], ...]:
    """Take offers in order up to ``demand``, respecting shared caps: (envelope key, GPUs).

    Returns a partial allocation when the offers cannot fund all of it; callers compare the sum.
    """
    return tuple(_greedy(funding.offers, funding.caps, demand))


def _is_borrow_cap(key: str) -> bool:
    return key == BORROW_CAP or key.startswith("lend:")


def _usable(offer: Offer, caps: Mapping[str, int]) -> bool:
    return offer.gpus > 0 and all(caps.get(k, 1) > 0 for k in offer.caps)


# -- cover ----------------------------------------------------------------------------------------


def _split(
    entries: Keyed, locations: Sequence[Selector]
) -> tuple[list[tuple[str, Envelope]], list[tuple[str, Envelope]]]:
    """(in the location, ordered by first matching location, stable), (elsewhere, in order)."""
    if len(locations) == 1:
        loc = locations[0]
        inside: list[tuple[str, Envelope]] = []
        elsewhere: list[tuple[str, Envelope]] = []
        for kv in entries:
            (inside if compatible(kv[1].selector, loc) else elsewhere).append(kv)
        return inside, elsewhere
    ranked: list[tuple[int, int, tuple[str, Envelope]]] = []
    outside: list[tuple[str, Envelope]] = []
    for pos, kv in enumerate(entries):
        sel = kv[1].selector
        idx = next((i for i, loc in enumerate(locations) if compatible(sel, loc)), None)
        if idx is None:
            outside.append(kv)
        else:
            ranked.append((idx, pos, kv))
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [t[2] for t in ranked], outside


def payers(request: RunRequest, family: Family) -> tuple[tuple[str, Envelope, FundingKind], ...]:
    """Every envelope that may pay for the Run, in cover order, with its funding class.

    The family steps and the sponsor step of the module docstring, before windows, headroom and
    the lenders' ACLs (a sponsor listed here still needs ``lends_to``). Cover draws its offers
    from this list and the binder checks a commit's payers against it, so both apply one rule.
    """
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
    if request.allow_borrow and request.sponsors:
        members = family.relatives(owner).members
        spons: Keyed = tuple(
            kv
            for s in dict.fromkeys(request.sponsors)
            if s not in members
            for kv in family.flavored(s, flavor)
        )
        spon_in, spon_out = _split(spons, locations)
        ordered += [(k, e, sponsor) for k, e in (*spon_in, *spon_out)]
    return tuple(ordered)


def cover(
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

    owned, fam_kind, sponsor = FundingKind.OWNED, FundingKind.FAMILY, FundingKind.SPONSOR
    ordered = list(payers(request, family))
    sponsor_count = sum(1 for _, _, kind in ordered if kind is sponsor)
    acl_allowed = sum(1 for _, e, kind in ordered if kind is sponsor and lends_to(e, owner))

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
