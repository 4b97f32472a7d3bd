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

The order depends only on the Budgets, so it is memoised per Family index; a call prices offers
along it and stops once they fund the demand (``Funding.complete`` says whether any were left).
Pack asks for the rest (``NeedsMoreOffers``) whenever its plan could depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from shared.engine.offers import Funding, Offer, has_node_keys

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


_Entry = tuple[str, Envelope, FundingKind]


@dataclass(frozen=True, slots=True)
class _Order:
    """Every envelope a Run may draw on, in SPEC §3 order: what only the Budgets decide.

    It depends on the owner, flavor, requested location and sponsors, never on usage or time, so
    it is computed once per Family index (``Family.cached``) and every cover call only walks it.
    Compact: the (key, envelope) pairs are the Family's own, and the funding kind is stored as
    runs of positions (``kinds``: (end position, kind) in order).
    """

    entries: Keyed
    kinds: tuple[tuple[int, FundingKind], ...]
    sponsor_count: int
    """Sponsor envelopes of the flavor (listed last, ACL refusals included)."""
    acl_allowed: int
    """...of which lend to the owner."""
    node_level: bool
    """Some envelope selects below the domain (e.g. a rack): pack's per-node payer sets then
    depend on every offer, so cover never stops early for such a Run."""

    def walk(self) -> Iterator[_Entry]:
        """(key, envelope, funding kind) in order."""
        entries, start = self.entries, 0
        for end, kind in self.kinds:
            for i in range(start, end):
                key, env = entries[i]
                yield key, env, kind
            start = end


def _order(request: RunRequest, family: Family, sponsors: tuple[str, ...]) -> _Order:
    owner, flavor = request.owner, request.flavor
    rel = family.relatives(owner)

    def of(owners: tuple[str, ...]) -> Keyed:
        return tuple(kv for o in owners for kv in family.flavored(o, flavor))

    own = family.flavored(owner, flavor)
    locations = requested_locations(request, [e for _, e in own])
    own_in, own_out = _split(own, locations)
    sibs_in, sibs_out = _split(of(rel.siblings), locations)
    pars_in, pars_out = _split(of(rel.parents), locations)
    cous_in, cous_out = _split(of(rel.cousins), locations)
    owned, fam_kind = FundingKind.OWNED, FundingKind.FAMILY
    runs: list[tuple[list[tuple[str, Envelope]], FundingKind]] = [
        (own_in, owned),
        (sibs_in + pars_in, fam_kind),
        (own_out, owned),
        (sibs_out + pars_out + cous_in + cous_out, fam_kind),
    ]
    sponsor_count = acl_allowed = 0
    if sponsors:
        spons: Keyed = tuple(
            kv
            for s in sponsors
            if not family.is_family(owner, s)
            for kv in family.flavored(s, flavor)
        )
        spon_in, spon_out = _split(spons, locations)
        runs.append((spon_in + spon_out, FundingKind.SPONSOR))
        sponsor_count = len(spons)
        acl_allowed = sum(1 for _, e in spons if lends_to(e, owner))
    entries: list[tuple[str, Envelope]] = []
    kinds: list[tuple[int, FundingKind]] = []
    for run, kind in runs:
        if run:
            entries += run
            kinds.append((len(entries), kind))
    return _Order(
        entries=tuple(entries),
        kinds=tuple(kinds),
        sponsor_count=sponsor_count,
        acl_allowed=acl_allowed,
        node_level=any(has_node_keys(e.selector) for _, e in entries),
    )


def payers(request: RunRequest, family: Family) -> tuple[_Entry, ...]:
    """Every envelope that may pay for the Run, in cover order, with its funding class.

    The family steps and the sponsor step of the module docstring, before windows, headroom and
    the lenders' ACLs (a sponsor listed here still needs ``lends_to``). Cover draws its offers
    from this order and the binder checks a commit's payers against it, so both apply one rule.
    """
    return tuple(_cached_order(request, family).walk())


def _cached_order(request: RunRequest, family: Family) -> _Order:
    sponsors = (
        tuple(dict.fromkeys(request.sponsors)) if request.allow_borrow and request.sponsors else ()
    )
    where = tuple(sorted(request.selector.items())) if request.selector else None
    key = ("cover-order", request.owner, request.flavor, where, sponsors)
    return family.cached(key, lambda: _order(request, family, sponsors))


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
    complete: bool = False,
) -> Funding | CoverDenied:
    """Fund ``demand`` (default: active GPUs + spares) in SPEC §3 order, or say why not.

    GPU-hours headroom prices every demanded GPU at the full rate for the expected duration
    (``maxDuration``, else ``default_duration``): cover cannot know which GPUs pack will make
    spares, so spares are priced conservatively at the full rate (``usage`` already applies the
    spare factor to what was consumed). ``already_borrowed`` is what the Run
    borrows today (a grow must stay within maxBorrowGPUs in total).

    Offers are priced lazily, in order, and cover stops as soon as the priced ones fund the
    demand (the greedy rule of :func:`allocate`); the Funding then says ``complete=False``. Pack
    answers ``NeedsMoreOffers`` when its plan could depend on an offer not priced yet, and the
    caller covers again with ``complete=True`` (every offer, as one pass always did). A refusal
    always prices everything, so its numbers and typed reason are those of the whole family.
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

    order = _cached_order(request, family)
    ordered = order.entries
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

    stop_early = not complete and not order.node_level
    env_usage = usage.envelopes
    sponsor = FundingKind.SPONSOR
    caps: dict[str, int] = {}
    remaining: dict[str, int] = {}  # caps left after the greedy takes so far
    offers: list[Offer] = []  # every offer with own headroom, for the BorrowLimit diagnosis
    usable: list[Offer] = []  # ...and those whose shared caps are not exhausted
    taken: list[tuple[str, int]] = []
    left = need
    in_window = 0
    borrow_left = (
        None
        if request.max_borrow_gpus is None
        else max(0, request.max_borrow_gpus - already_borrowed)
    )
    last = len(ordered) - 1
    for pos, (key, env, kind) in enumerate(order.walk()):
        if not window_allows(env, now, for_reservation=for_reservation):
            continue
        in_window += 1
        if kind is sponsor and not lends_to(env, owner):
            continue
        eu = env_usage.get(key)
        used = ZERO if eu is None else eu.total
        gpus = env.concurrency - used.gpus
        if env.max_gpu_hours is not None and gpus > 0:
            hours_to_spend = hours_left(env.max_gpu_hours, used, default_hours)
            gpus = min(gpus, gpus_for_hours(hours_to_spend, hours))
        if gpus <= 0:
            continue
        keys: list[str] = []
        ok = True
        for cap in family.caps_for(key):
            ck = agg_cap_key(cap.key)
            left_gpus = caps.get(ck)
            if left_gpus is None:
                left_gpus = caps[ck] = remaining[ck] = cap_limit(cap, usage, hours, default_hours)
            ok = ok and left_gpus > 0
            keys.append(ck)
        if kind is sponsor:
            lend = lend_limit(env, usage, hours, default_hours)
            if lend is not None:
                ck = lend_cap_key(key)
                caps[ck] = remaining[ck] = lend
                keys.append(ck)
                ok = ok and lend > 0
            if borrow_left is not None:
                if BORROW_CAP not in caps:
                    caps[BORROW_CAP] = remaining[BORROW_CAP] = borrow_left
                keys.append(BORROW_CAP)
                ok = ok and borrow_left > 0
        offer = Offer(envelope=env, gpus=gpus, kind=kind, caps=tuple(keys))
        offers.append(offer)
        if not ok:
            continue
        usable.append(offer)
        if left > 0:  # the greedy rule, one offer at a time (``_greedy``)
            take = min(gpus, left)
            for ck in keys:
                take = min(take, remaining[ck])
            if take > 0:
                for ck in keys:
                    remaining[ck] -= take
                left -= take
                taken.append((key, take))
        if left <= 0 and stop_early:
            return Funding(offers=tuple(usable), caps=MappingProxyType(caps), complete=pos == last)

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
    if left <= 0:
        return Funding(offers=tuple(usable), caps=frozen_caps)
    return _denied(
        request, order, offers, usable, taken, frozen_caps, need, already_borrowed, in_window
    )


def _denied(
    request: RunRequest,
    order: _Order,
    offers: Sequence[Offer],
    usable: Sequence[Offer],
    taken: Sequence[tuple[str, int]],
    caps: Mapping[str, int],
    need: int,
    already_borrowed: int,
    in_window: int,
) -> CoverDenied:
    """The typed refusal once every offer is priced: which limit stops the demand, with numbers."""
    owner, flavor = request.owner, request.flavor
    owned, fam_kind, sponsor = FundingKind.OWNED, FundingKind.FAMILY, FundingKind.SPONSOR
    funded = sum(t for _, t in taken)
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
            caps,
        )
    if order.sponsor_count and order.acl_allowed == 0:
        return CoverDenied(
            CoverFailure.ACL_DENIED,
            f"ACLDenied: {head}; all {order.sponsor_count} {flavor} envelope(s) of sponsors "
            f"{', '.join(dict.fromkeys(request.sponsors))} refuse to lend to {owner}; "
            f"short by {short}",
            short,
            shown,
            need,
            caps,
        )
    skipped = len(order.entries) - in_window
    note = f"; {skipped} envelope(s) outside their window" if skipped else ""
    borrow = "" if request.allow_borrow else "; borrowing not allowed (allowBorrow false)"
    where = f"{flavor} envelope(s) for {owner}"
    return CoverDenied(
        CoverFailure.INSUFFICIENT_CAPACITY,
        f"InsufficientCapacity: {head} from {len(usable)} of {len(order.entries)} {where}; "
        f"short by {short}{note}{borrow}",
        short,
        shown,
        need,
        caps,
    )
