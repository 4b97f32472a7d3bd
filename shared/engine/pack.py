"""Pack — where a Run's gang goes, and which offer pays for every placed GPU (SPEC §3 Pack).

Rules, in the order they bite:

* Only nodes of the Run's flavor, schedulable, matching the Run's selector and at least one payer's
  selector, minus GPUs protected for reservations, are candidates; a rank's pod must also fit the
  node (``shared.engine.capacity``: other pods' requests, taints, the template's selectors), and a
  node takes as many of the Run's ranks as its CPU, memory, storage and pod slots allow.
* The gang is cut into groups (``groupGPUs``; else a malleable Run's ``stepGPUs``; else every node
  slice is its own group). Each group sits in one domain; the last fixed group may be smaller.
* Pack-to-empty: a group goes to a domain the Run already uses, else where the earliest offer in
  cover order can pay, else the one with most free GPUs, else the smallest domain key. A domain that
  also holds the group's spares beats one that does not.
* Inside a domain: whole nodes, largest free first (rack, then name, break ties); the remainder goes
  to the tightest node that holds it, so big nodes stay whole for the next gang. Nodes with an
  untolerated ``PreferNoSchedule`` taint come after all others.
* Each slice is paid by offers in cover order whose selector matches the node, within every offer's
  GPUs and shared caps; a slice two offers pay becomes two ``PlacedSlice`` entries.
* No partial gang: all groups fit or the result is ``NoFit`` with a typed reason and the numbers.
* A prefix Funding (cover stopped once it could fund the demand) gives the plan the complete one
  would, or ``NeedsMoreOffers``: pack asks for the rest whenever a decision touched its end — a
  domain whose payers ran short, a slice the listed offers could not pay, a domain the Run already
  uses that none of them can pay in, or no fit at all.

The function is pure and deterministic: the same inputs give the same plan, byte for byte. It reads
the per-domain free index of ``Topology`` and sorts nodes only inside the domains it uses, so
planning 1,024 GPUs on 10,000 nodes costs milliseconds (see ``bench/bench_pack.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain
from types import MappingProxyType
from typing import TypeGuard

from shared.engine.capacity import NO_LOAD, disfavoured, exclusion, slots
from shared.engine.model import (
    DOMAIN_LABELS,
    FLAVOR_LABEL,
    RACK_LABEL,
    DomainKey,
    FundingKind,
    Node,
    PodNeeds,
    Role,
    RunRequest,
    Selector,
)
from shared.engine.offers import Funding, Offer
from shared.engine.topology import Topology

# --------------------------------------------------------------------------- result types


class PackFailure(StrEnum):
    """Why no placement exists now; surfaced in Run status and `kubectl runs plan`."""

    NO_CAPACITY = "NoCapacity"
    """Not enough free schedulable GPUs of the flavor/location, whoever pays."""
    NO_FUNDED_CAPACITY = "NoFundedCapacity"
    """GPUs exist, but not where (or not as many as) the offers can pay for."""
    SPREAD_FORBIDDEN = "SingleDomainNoFit"
    """``allowCrossGroupSpread=false`` and no single domain holds the whole gang."""
    MORE_OFFERS = "NeedsMoreOffers"
    """Not a verdict on the Run: the Funding was a prefix (``complete=False``) and the plan could
    depend on offers cover did not price. The caller covers again with ``complete=True``."""


@dataclass(frozen=True, slots=True)
class PlacedSlice:
    """GPUs of one rank (or spare) on one node, paid by one envelope."""

    node: str
    gpus: int
    role: Role
    group: int
    rank: int
    """Rank in the gang's world; -1 for spares, which are not ranks."""
    envelope: str
    payer_owner: str
    funding: FundingKind


@dataclass(frozen=True, slots=True)
class GroupPlacement:
    index: int
    domain: DomainKey
    """Domain of the group's active slices (spares that did not fit there may sit elsewhere)."""
    slices: tuple[PlacedSlice, ...]

    @property
    def active_gpus(self) -> int:
        """GPUs of the group's ranks: Active, or Borrowed when placed as fill (``fill.as_fill``)."""
        return sum(s.gpus for s in self.slices if s.role is not Role.SPARE)

    @property
    def spare_gpus(self) -> int:
        return sum(s.gpus for s in self.slices if s.role is Role.SPARE)


@dataclass(frozen=True, slots=True)
class Placement:
    groups: tuple[GroupPlacement, ...]

    @property
    def slices(self) -> tuple[PlacedSlice, ...]:
        return tuple(s for g in self.groups for s in g.slices)

    @property
    def active_gpus(self) -> int:
        return sum(g.active_gpus for g in self.groups)

    @property
    def spare_gpus(self) -> int:
        return sum(g.spare_gpus for g in self.groups)

    @property
    def gpus(self) -> int:
        """Every GPU the plan holds, actives and spares (what cover had to fund)."""
        return self.active_gpus + self.spare_gpus

    @property
    def ranks(self) -> tuple[int, ...]:
        """Distinct ranks of the plan (Active or Borrowed), ascending."""
        return tuple(sorted({s.rank for s in self.slices if s.role is not Role.SPARE}))

    @property
    def domains(self) -> tuple[DomainKey, ...]:
        """Group domains in group order, without repeats."""
        return tuple(dict.fromkeys(g.domain for g in self.groups))

    def by_envelope(self) -> Mapping[str, int]:
        """GPUs (actives + spares) each paying envelope carries in this plan."""
        totals: Counter[str] = Counter()
        for s in self.slices:
            totals[s.envelope] += s.gpus
        return MappingProxyType(dict(sorted(totals.items())))

    def by_node(self) -> Mapping[str, int]:
        """GPUs the plan takes on each node."""
        totals: Counter[str] = Counter()
        for s in self.slices:
            totals[s.node] += s.gpus
        return MappingProxyType(dict(sorted(totals.items())))


@dataclass(frozen=True, slots=True)
class NoFit:
    reason: PackFailure
    message: str


# --------------------------------------------------------------------------- selectors

_DOMAIN_POS = {label: i for i, label in enumerate(DOMAIN_LABELS)}


@dataclass(frozen=True, slots=True)
class _Split:
    """A selector split into keys constant per domain (checked once) and per-node keys."""

    domain: tuple[tuple[int, str], ...]
    node: tuple[tuple[str, str], ...]
    flavor_ok: bool

    def domain_ok(self, domain: DomainKey) -> bool:
        return all(domain[i] == v for i, v in self.domain)

    def node_ok(self, node: Node) -> bool:
        return all(node.labels.get(k) == v for k, v in self.node)

    def schedulable(self, nodes: Iterable[Node]) -> list[Node]:
        """Schedulable nodes matching the per-node keys (the common one-key case unrolled)."""
        if not self.node:
            return [n for n in nodes if n.schedulable]
        if len(self.node) == 1:
            key, value = self.node[0]
            return [n for n in nodes if n.schedulable and n.labels.get(key) == value]
        return [n for n in nodes if n.schedulable and self.node_ok(n)]


def _matching(domains: list[DomainKey], sel: _Split) -> list[DomainKey]:
    """Domains whose region/cluster/fabric satisfy the selector's domain-level keys."""
    if not sel.domain:
        return domains
    if len(sel.domain) == 1:
        pos, value = sel.domain[0]
        return [d for d in domains if d[pos] == value]
    return [d for d in domains if sel.domain_ok(d)]


def _split(selector: Selector, flavor: str) -> _Split:
    dom: list[tuple[int, str]] = []
    per_node: list[tuple[str, str]] = []
    flavor_ok = True
    for key, value in sorted(selector.items()):
        if key in _DOMAIN_POS:
            dom.append((_DOMAIN_POS[key], value))
        elif key == FLAVOR_LABEL:
            flavor_ok = flavor_ok and value == flavor
        else:
            per_node.append((key, value))
    return _Split(tuple(dom), tuple(per_node), flavor_ok)


# --------------------------------------------------------------------------- the packer

_Pay = list[tuple[int, int]]
"""(offer index, GPUs) splits paying one slice."""
_Take = tuple[Node, _Pay]
_Cand = tuple[Node, tuple[int, ...], int]
"""(node, offer indices that may pay on it, GPUs available to this plan)."""


def _sort_key(c: _Cand) -> tuple[int, str, str]:
    return (-c[2], c[0].labels.get(RACK_LABEL, ""), c[0].name)


def _last_resort_key(needs: PodNeeds) -> Callable[[_Cand], tuple[bool, int, str, str]]:
    """``_sort_key`` with nodes the Run's pods would rather avoid (PreferNoSchedule) last."""

    def key(c: _Cand) -> tuple[bool, int, str, str]:
        return (disfavoured(c[0], needs), -c[2], c[0].labels.get(RACK_LABEL, ""), c[0].name)

    return key


def _static_pick(avails: Sequence[int], need: int) -> list[tuple[int, int]]:
    """Whole nodes largest-first; the remainder goes to the tightest node that holds it.

    ``avails`` is sorted descending. Returns (position, GPUs) picks; short if capacity is short.
    """
    picks: list[tuple[int, int]] = []
    remaining = need
    i = 0
    while remaining > 0 and i < len(avails):
        if avails[i] <= remaining:
            picks.append((i, avails[i]))
            remaining -= avails[i]
            i += 1
            continue
        best = i
        for j in range(i + 1, len(avails)):
            if avails[j] < remaining:
                break
            if avails[j] < avails[best]:
                best = j
        picks.append((best, remaining))
        remaining = 0
    return picks


class _Packer:
    """Mutable scratch state of one ``pack`` call, with an undo log for trial placements."""

    def __init__(
        self,
        request: RunRequest,
        topology: Topology,
        funding: Funding,
        used_domains: Collection[DomainKey],
        protected: Mapping[str, int],
    ) -> None:
        self.request = request
        self.topology = topology
        self.flavor = request.flavor
        self.protected = {k: v for k, v in protected.items() if v > 0}
        self.offers: tuple[Offer, ...] = funding.offers
        self.req = _split(request.selector, self.flavor)
        self.sels = tuple(_split(o.envelope.selector, self.flavor) for o in self.offers)
        self.left = [max(0, o.gpus) for o in self.offers]
        self.caps: dict[str, int] = dict(funding.caps)
        usable = tuple(
            i
            for i, o in enumerate(self.offers)
            if o.gpus > 0 and o.envelope.flavor == self.flavor and self.sels[i].flavor_ok
        )
        self.per_node_payers = any(self.sels[i].node for i in usable)
        self.per_node = bool(self.req.node) or self.per_node_payers
        self.needs = request.pod
        self.picky = bool(self.needs.node_selector or self.needs.affinity)
        """The template narrows nodes by label: every node is checked."""
        self.uniform: dict[DomainKey, bool] = {}
        self.slot_counts: dict[str, int] = {}
        self.ranks_on: dict[str, int] = {}
        """Ranks (pods) this plan has put on each node: their CPU/memory count too."""
        self.taken: dict[str, int] = {}
        self.undo: list[tuple[int, object, int]] = []
        self.used: set[DomainKey] = set()
        self.touched: set[DomainKey] = set()
        self.live = [self._is_live(i) for i in range(len(self.offers))]
        self.node_cache: dict[DomainKey, list[tuple[Node, tuple[int, ...]]]] = {}
        self.prefix = not funding.complete
        self.starved = self.prefix and self.per_node_payers
        """A decision depended on offers after the prefix: the plan must be redone with them."""

        self.payers: dict[DomainKey, tuple[int, ...]] = {}
        self.cap: dict[DomainKey, int] = {}
        self.first: dict[tuple[int, ...], int] = {}
        self.req_ok = self.req.flavor_ok
        free_index = topology.domains(self.flavor)
        prot = self._protected_by_domain() if self.protected else {}
        # Domain-level keys are checked once per selector over the domain list, never per node.
        doms = [d for d in free_index if self.req.domain_ok(d)] if self.req_ok else []
        matched: dict[DomainKey, list[int]] = {}
        for i in usable:
            for d in _matching(doms, self.sels[i]):
                matched.setdefault(d, []).append(i)
        interned: dict[tuple[int, ...], tuple[int, ...]] = {}
        for dom, payer_list in matched.items():
            ps = interned.setdefault(tuple(payer_list), tuple(payer_list))
            free = free_index[dom]
            if free <= 0:
                continue
            if self.per_node or not self._uniform(dom):
                room = self._room(dom, (n for n, _ in self._nodes(dom, ps)))
            else:
                room = free - prot.get(dom, 0)
            if room > 0:
                self.payers[dom] = ps
                self.cap[dom] = room
        self.used.update(d for d in used_domains if d in self.payers)
        if self.prefix and any(d not in self.payers for d in used_domains):
            self.starved = True
        self._unused: list[DomainKey] = []
        self._dirty = True

    # ---- capacity

    def _uniform(self, dom: DomainKey) -> bool:
        """Every schedulable node of the domain takes a rank pod (no taint, enough room left):
        the domain's free-GPU index then holds as it is and no node needs checking."""
        known = self.uniform.get(dom)
        if known is None:
            floor = self.topology.floor(self.flavor, dom)
            known = not self.picky and not floor.tainted
            if known and floor.room is not None:
                known = slots(floor.room, NO_LOAD, self.needs) >= 1
            self.uniform[dom] = known
        return known

    def _fits(self, node: Node) -> bool:
        """A rank pod of this Run may go on the node (taints, selectors, resources)."""
        return exclusion(node, self.topology.load(node.name), self.needs) is None

    def _slots(self, node: Node) -> int:
        """Rank pods of this Run the node can hold besides what it already runs."""
        known = self.slot_counts.get(node.name)
        if known is None:
            known = slots(node.capacity, self.topology.load(node.name), self.needs)
            self.slot_counts[node.name] = known
        return known

    def _eligible(self, dom: DomainKey) -> list[Node]:
        """Nodes of the domain the Run's selector and pod needs allow, whoever pays."""
        nodes = self.req.schedulable(self.topology.nodes_in(self.flavor, dom))
        return nodes if self._uniform(dom) else [n for n in nodes if self._fits(n)]

    def _protected_by_domain(self) -> dict[DomainKey, int]:
        """GPUs protected per domain, counting only what is really free on each node."""
        out: dict[DomainKey, int] = {}
        for name, gpus in self.protected.items():
            node = self.topology.node(name)
            if node is None or node.flavor != self.flavor or gpus <= 0:
                continue
            out[node.domain] = out.get(node.domain, 0) + min(gpus, self.topology.free(name))
        return out

    def _room(self, dom: DomainKey, nodes: Iterable[Node]) -> int:
        """GPUs this plan may still take on the given nodes of one domain."""
        free = self.topology.free_in(self.flavor, dom)
        prot, taken = self.protected, self.taken
        if not prot and not taken:
            return sum(free[n.name] for n in nodes)
        return sum(max(0, free[n.name] - prot.get(n.name, 0) - taken.get(n.name, 0)) for n in nodes)

    def _avail(self, node: Node, pods: bool = True) -> int:
        """GPUs this plan may still take on the node; with ``pods``, as a new rank's pod, which
        needs a pod's worth of room left after the ranks already planned there."""
        name = node.name
        if pods and self.ranks_on.get(name) and self.ranks_on[name] >= self._slots(node):
            return 0
        free = self.topology.free(name)
        return max(0, free - self.protected.get(name, 0) - self.taken.get(name, 0))

    def _nodes(
        self, dom: DomainKey, payers: tuple[int, ...] | None = None
    ) -> list[tuple[Node, tuple[int, ...]]]:
        """Eligible nodes of a domain with the offers that may pay on each (cached per call)."""
        cached = self.node_cache.get(dom)
        if cached is not None:
            return cached
        ps = self.payers[dom] if payers is None else payers
        out: list[tuple[Node, tuple[int, ...]]] = []
        for node in self._eligible(dom):
            node_ps = (
                tuple(i for i in ps if self.sels[i].node_ok(node)) if self.per_node_payers else ps
            )
            if node_ps:
                out.append((node, node_ps))
        self.node_cache[dom] = out
        return out

    def _candidates(
        self, dom: DomainKey, exclude: Collection[str] = (), pods: bool = True
    ) -> list[_Cand]:
        cands = [
            (n, ps, a)
            for n, ps in self._nodes(dom)
            if n.name not in exclude and (a := self._avail(n, pods)) > 0
        ]
        if self.topology.floor(self.flavor, dom).disfavoured:
            cands.sort(key=_last_resort_key(self.needs))
        else:
            cands.sort(key=_sort_key)
        return cands

    def physical_room(self) -> dict[DomainKey, int]:
        """Free GPUs per domain for the Run's flavor and location, ignoring who pays."""
        out: dict[DomainKey, int] = {}
        if not self.req_ok:
            return out
        held: dict[DomainKey, int] = {}
        if not self.req.node:
            held = self._protected_by_domain()
            for name, gpus in self.taken.items():
                node = self.topology.node(name)
                if node is not None:
                    held[node.domain] = held.get(node.domain, 0) + gpus
        for dom, free in self.topology.domains(self.flavor).items():
            if not self.req.domain_ok(dom):
                continue
            if self.req.node or not self._uniform(dom):
                room = self._room(dom, self._eligible(dom))
            else:
                room = free - held.get(dom, 0)
            if room > 0:
                out[dom] = room
        return out

    # ---- payers

    def _is_live(self, i: int) -> bool:
        if self.left[i] <= 0:
            return False
        return all(self.caps.get(c, 1) > 0 for c in self.offers[i].caps)

    def _refresh_live(self) -> None:
        live = [self._is_live(i) for i in range(len(self.offers))]
        if live != self.live:
            self.live = live
            self.first.clear()
            self._dirty = True

    def fundable(self, dom: DomainKey) -> int:
        """Upper bound of what the domain's payers can still fund (ignores caps)."""
        return sum(self.left[i] for i in self.payers[dom] if self.live[i])

    def funds(self, dom: DomainKey, need: int) -> bool:
        """``fundable(dom) >= need``; a prefix that falls short there asks for more offers."""
        if self.fundable(dom) >= need:
            return True
        self.starved = self.starved or self.prefix
        return False

    def _pay(self, payers: tuple[int, ...], amount: int) -> tuple[_Pay, int]:
        """Split ``amount`` across payers in cover order; returns splits and the unpaid rest."""
        splits: _Pay = []
        for i in payers:
            if amount <= 0:
                break
            t = min(amount, self.left[i])
            for c in self.offers[i].caps:
                if c in self.caps:
                    t = min(t, self.caps[c])
            if t <= 0:
                continue
            self._set_left(i, self.left[i] - t)
            for c in self.offers[i].caps:
                if c in self.caps:
                    self._set_cap(c, self.caps[c] - t)
            splits.append((i, t))
            amount -= t
        if amount > 0 and self.prefix:
            self.starved = True
        return splits, amount

    # ---- undo log

    def mark(self) -> int:
        return len(self.undo)

    def rollback(self, mark: int) -> None:
        while len(self.undo) > mark:
            kind, key, old = self.undo.pop()
            if kind == 0:
                assert isinstance(key, int)
                self.left[key] = old
            elif kind == 1:
                assert isinstance(key, str)
                self.caps[key] = old
            elif kind == 2:
                assert isinstance(key, str)
                if old:
                    self.taken[key] = old
                else:
                    self.taken.pop(key, None)
            elif kind == 4:
                assert isinstance(key, str)
                if old:
                    self.ranks_on[key] = old
                else:
                    self.ranks_on.pop(key, None)
            else:
                assert isinstance(key, tuple)
                self.cap[key] = old

    def _set_left(self, i: int, value: int) -> None:
        self.undo.append((0, i, self.left[i]))
        self.left[i] = value

    def _set_cap(self, key: str, value: int) -> None:
        self.undo.append((1, key, self.caps[key]))
        self.caps[key] = value

    def _take(self, node: Node, gpus: int, pod: bool) -> None:
        self.undo.append((2, node.name, self.taken.get(node.name, 0)))
        self.taken[node.name] = self.taken.get(node.name, 0) + gpus
        if pod:
            self.undo.append((4, node.name, self.ranks_on.get(node.name, 0)))
            self.ranks_on[node.name] = self.ranks_on.get(node.name, 0) + 1
        self.undo.append((3, node.domain, self.cap[node.domain]))
        self.cap[node.domain] -= gpus
        self.touched.add(node.domain)

    # ---- domain ranking

    def _first_live(self, payers: tuple[int, ...]) -> int:
        """Cover-order index of the earliest offer that can still pay in a domain."""
        first = self.first.get(payers)
        if first is None:
            first = next((i for i in payers if self.live[i]), len(self.offers))
            self.first[payers] = first
        return first

    def _key(self, dom: DomainKey) -> tuple[int, int, int, DomainKey]:
        return (
            0 if dom in self.used else 1,
            self._first_live(self.payers[dom]),
            -self.cap[dom],
            dom,
        )

    def ranked(self, only: Collection[DomainKey] | None = None) -> Iterator[DomainKey]:
        """Domains in pack-to-empty order: used, earliest payer, most free, smallest key."""
        if only is not None:
            return iter(sorted((d for d in only if d in self.payers), key=self._key))
        used = sorted(self.used, key=self._key)
        if any(d not in self.used for d in self.touched):
            self._dirty = True
        self.touched.clear()
        if self._dirty:
            first, cap, payers = self._first_live, self.cap, self.payers
            keyed = sorted(
                (first(payers[d]), -cap[d], d) for d in self.payers if d not in self.used
            )
            self._unused = [k[2] for k in keyed]
            self._dirty = False
        unused = self._unused
        return chain(used, (d for d in unused if d not in self.used))

    # ---- filling

    def fill(
        self,
        dom: DomainKey,
        need: int,
        *,
        exclude: Collection[str] = (),
        partial: bool = False,
        pods: bool = True,
    ) -> list[_Take] | None:
        """Take ``need`` paid GPUs in one domain, or ``None`` (state untouched).

        With ``partial`` it takes what it can (possibly nothing) instead of failing. Each node
        taken is one rank's pod unless ``pods`` is False (spares hold GPUs, they run no pod).
        """
        if need <= 0:
            return []
        mark = self.mark()
        cands = self._candidates(dom, exclude, pods)
        avails = [c[2] for c in cands]
        if sum(avails) >= need:
            takes: list[_Take] = []
            for pos, gpus in _static_pick(avails, need):
                node, payers, _ = cands[pos]
                splits, unpaid = self._pay(payers, gpus)
                if unpaid:
                    break
                self._take(node, gpus, pods)
                takes.append((node, splits))
            else:
                self._refresh_live()
                return takes
            self.rollback(mark)
        elif not partial:
            return None
        # Funding is the bottleneck: take whatever the offers can pay, largest nodes first.
        takes = []
        remaining = need
        for node, payers, avail in cands:
            splits, unpaid = self._pay(payers, min(avail, remaining))
            paid = min(avail, remaining) - unpaid
            if paid:
                self._take(node, paid, pods)
                takes.append((node, splits))
                remaining -= paid
            if remaining == 0:
                break
        if remaining and not partial:
            self.rollback(mark)
            return None
        self._refresh_live()
        return takes

    def spares(
        self, home: DomainKey, need: int, avoid: Collection[str], elsewhere: bool
    ) -> list[_Take] | None:
        """Spare GPUs for a group: its own domain first (off its active nodes), then elsewhere."""
        if need <= 0:
            return []
        mark = self.mark()
        takes: list[_Take] = []
        remaining = need
        others = (d for d in self.ranked() if d != home) if elsewhere else iter(())
        for dom in chain((home,), others):
            # In the home domain, nodes without the group's actives first: a spare on a node that
            # already runs the group cannot replace it when that node fails.
            for exclude in (avoid, ()) if dom == home and avoid else ((),):
                room = self.cap.get(dom, 0)
                if room <= 0:
                    break
                got = (
                    self.fill(dom, min(remaining, room), exclude=exclude, partial=True, pods=False)
                    or []
                )
                takes.extend(got)
                remaining -= sum(g for _, splits in got for _, g in splits)
                if remaining == 0:
                    return _merge(takes)
        self.rollback(mark)
        return None


def _merge(takes: Sequence[_Take]) -> list[_Take]:
    """One take per node (first-seen order), one split per payer: repeated fills can revisit."""
    by_node: dict[str, tuple[Node, dict[int, int]]] = {}
    for node, splits in takes:
        _, paid = by_node.setdefault(node.name, (node, {}))
        for i, gpus in splits:
            paid[i] = paid.get(i, 0) + gpus
    return [(node, sorted(paid.items())) for node, paid in by_node.values()]


# --------------------------------------------------------------------------- assembling slices


def _slices(
    p: _Packer, takes: Sequence[_Take], role: Role, group: int, first_rank: int
) -> tuple[list[PlacedSlice], int]:
    """PlacedSlices for takes, one rank per node for actives; returns them and the next rank."""
    out: list[PlacedSlice] = []
    rank = first_rank
    for node, splits in takes:
        for i, gpus in splits:
            offer = p.offers[i]
            out.append(
                PlacedSlice(
                    node=node.name,
                    gpus=gpus,
                    role=role,
                    group=group,
                    rank=rank if role is Role.ACTIVE else -1,
                    envelope=offer.envelope.key,
                    payer_owner=offer.envelope.owner,
                    funding=offer.kind,
                )
            )
        if role is Role.ACTIVE:
            rank += 1
    return out, rank


def group_sizes(request: RunRequest, gpus: int) -> tuple[int, ...] | None:
    """Active GPUs per group: fixed groups with a smaller last one, or ``None`` (node-granular)."""
    size = request.group_gpus
    if size is None and request.malleable is not None:
        size = request.malleable.step_gpus
    if size is None:
        return None
    if size <= 0:
        raise ValueError(f"group size must be positive, got {size}")
    full, rest = divmod(gpus, size)
    return (size,) * full + ((rest,) if rest else ())


# --------------------------------------------------------------------------- entry point


def pack(
    request: RunRequest,
    topology: Topology,
    funding: Funding,
    *,
    gpus: int | None = None,
    first_group: int = 0,
    first_rank: int = 0,
    used_domains: Collection[DomainKey] = (),
    protected: Mapping[str, int] = MappingProxyType({}),
) -> Placement | NoFit:
    """Place ``gpus`` active GPUs (default: the whole Run) plus spares, all or nothing.

    ``first_group``/``first_rank`` number the new groups and ranks after existing ones (grow);
    ``used_domains`` are domains the Run already occupies; ``protected`` maps node → GPUs this Run
    may not take (capacity promised to reservations).
    """
    active = request.total_gpus if gpus is None else gpus
    if active < 0 or request.spares_per_group < 0:
        raise ValueError("gpus and spares_per_group must not be negative")
    if active == 0:
        return Placement(groups=())
    sizes = group_sizes(request, active)
    spares = request.spares_per_group
    demand = active + spares * (len(sizes) if sizes is not None else 1)
    if funding.total < demand and not funding.complete:
        return _more_offers(demand, funding)
    if funding.total < demand:
        return NoFit(
            PackFailure.NO_FUNDED_CAPACITY,
            f"needs {demand} GPUs ({active} active + spares); offers fund at most {funding.total}",
        )
    p = _Packer(request, topology, funding, used_domains, protected)
    if sizes is None:
        placed = _pack_nodes(p, active, spares, first_group, first_rank, used_domains)
    elif not request.allow_cross_group_spread:
        placed = _pack_one_domain(p, sizes, spares, first_group, first_rank, used_domains)
    else:
        placed = _pack_groups(p, sizes, spares, first_group, first_rank)
    if p.prefix and (p.starved or isinstance(placed, NoFit)):
        return _more_offers(demand, funding)
    return placed


def _more_offers(demand: int, funding: Funding) -> NoFit:
    return NoFit(
        PackFailure.MORE_OFFERS,
        f"{PackFailure.MORE_OFFERS.value}: the plan for {demand} GPUs depends on offers after the "
        f"{len(funding.offers)} cover listed",
    )


def needs_more_offers(placed: Placement | NoFit) -> bool:
    """True when pack asks the caller to cover again with ``complete=True`` and retry."""
    return isinstance(placed, NoFit) and placed.reason is PackFailure.MORE_OFFERS


def _place_group(
    p: _Packer, dom: DomainKey, size: int, spares: int, index: int, rank: int, elsewhere: bool
) -> tuple[GroupPlacement, int] | None:
    mark = p.mark()
    actives = p.fill(dom, size)
    if actives is None:
        return None
    spare_takes = p.spares(dom, spares, {n.name for n, _ in actives}, elsewhere)
    if spare_takes is None:
        p.rollback(mark)
        return None
    active_slices, next_rank = _slices(p, actives, Role.ACTIVE, index, rank)
    spare_slices, _ = _slices(p, spare_takes, Role.SPARE, index, rank)
    p.used.add(dom)
    return GroupPlacement(index, dom, tuple(active_slices + spare_slices)), next_rank


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _group_failure(p: _Packer, size: int, spares: int, what: str) -> NoFit:
    """Typed NoFit naming the numbers.

    Judged on free GPUs whoever pays: if the group (with its spares at home, or spilled when
    spread is allowed) could fit physically, the offers are what is short.
    """
    room = p.physical_room()
    physical = max(room.values(), default=0)
    funded = max(p.cap.values(), default=0)
    where = p.flavor + (f" {dict(p.request.selector)}" if p.request.selector else "")
    could_fit = physical >= size + spares or (
        spares > 0 and physical >= size and sum(room.values()) >= size + spares
    )
    if not could_fit:
        return NoFit(
            PackFailure.NO_CAPACITY, f"{what}; largest {where} domain has {physical} free GPUs"
        )
    return NoFit(
        PackFailure.NO_FUNDED_CAPACITY,
        f"{what}; largest funded domain free {funded} (largest {where} domain free {physical})",
    )


def _pack_groups(
    p: _Packer, sizes: Sequence[int], spares: int, first_group: int, first_rank: int
) -> Placement | NoFit:
    groups: list[GroupPlacement] = []
    rank = first_rank
    for k, size in enumerate(sizes):
        index = first_group + k
        placed: tuple[GroupPlacement, int] | None = None
        # Prefer a domain holding the whole group with its spares; spill spares only if none does.
        phases = ((size + spares, False), (size, True)) if spares else ((size, False),)
        for need, elsewhere in phases:
            for dom in p.ranked():
                if p.cap[dom] < need or not p.funds(dom, need):
                    continue
                placed = _place_group(p, dom, size, spares, index, rank, elsewhere)
                if placed is not None:
                    break
            if placed is not None:
                break
        if placed is None:
            spare_note = f" + {_plural(spares, 'spare')}" if spares else ""
            return _group_failure(
                p,
                size,
                spares,
                f"needs {_plural(len(sizes), 'group')} of {sizes[0]} GPUs{spare_note} each; "
                f"placed {len(groups)}, group {index} ({size} GPUs{spare_note}) fits nowhere",
            )
        group, rank = placed
        groups.append(group)
    return Placement(groups=tuple(groups))


def _pack_one_domain(
    p: _Packer,
    sizes: Sequence[int],
    spares: int,
    first_group: int,
    first_rank: int,
    used_domains: Collection[DomainKey],
) -> Placement | NoFit:
    total = sum(sizes) + spares * len(sizes)
    candidates = p.ranked(only=used_domains) if used_domains else p.ranked()
    for dom in candidates:
        if p.cap[dom] < total:
            continue
        if not p.funds(dom, total):
            continue
        mark = p.mark()
        groups: list[GroupPlacement] = []
        rank = first_rank
        for k, size in enumerate(sizes):
            placed = _place_group(p, dom, size, spares, first_group + k, rank, False)
            if placed is None:
                break
            group, rank = placed
            groups.append(group)
        else:
            return Placement(groups=tuple(groups))
        p.rollback(mark)
    what = f"needs {total} GPUs ({_plural(len(sizes), 'group')} of {sizes[0]}"
    what += f" + {_plural(spares, 'spare')} each" if spares else ""
    what += ") in one domain"
    if used_domains:
        what += f" it already uses ({', '.join('/'.join(d) for d in sorted(used_domains))})"
    return _one_domain_failure(p, total, what, used_domains)


def _one_domain_failure(
    p: _Packer, total: int, what: str, used_domains: Collection[DomainKey]
) -> NoFit:
    """Capacity in an allowed domain → payers are short; else spread (or the fleet) is."""
    physical = p.physical_room()
    allowed = set(used_domains) if used_domains else None
    best = max((v for d, v in physical.items() if allowed is None or d in allowed), default=0)
    funded = max((v for d, v in p.cap.items() if allowed is None or d in allowed), default=0)
    if best >= total:
        return NoFit(
            PackFailure.NO_FUNDED_CAPACITY,
            f"{what}; largest funded domain free {funded} (largest domain free {best})",
        )
    if allowed is None and sum(physical.values()) < total:
        return NoFit(
            PackFailure.NO_CAPACITY,
            f"{what}; only {sum(physical.values())} {p.flavor} GPUs free in the requested location",
        )
    return NoFit(
        PackFailure.SPREAD_FORBIDDEN,
        f"{what}; largest domain free {best}, cross-group spread forbidden",
    )


def _pack_nodes(
    p: _Packer,
    active: int,
    spares: int,
    first_group: int,
    first_rank: int,
    used_domains: Collection[DomainKey],
) -> Placement | NoFit:
    """No group size: every node slice is its own group, free to spread over domains."""
    mark = p.mark()
    forbid_spread = not p.request.allow_cross_group_spread
    if forbid_spread:
        for dom in p.ranked(only=used_domains) if used_domains else p.ranked():
            if p.cap[dom] < active:
                continue
            takes = p.fill(dom, active)
            if takes is None:
                continue
            placed = _node_groups(p, [(dom, takes)], spares, first_group, first_rank, False)
            if placed is not None:
                return placed
            p.rollback(mark)
        return _one_domain_failure(p, active, f"needs {active} GPUs in one domain", used_domains)
    remaining = active
    placed_by_domain: list[tuple[DomainKey, list[_Take]]] = []
    tried: set[DomainKey] = set()
    while remaining > 0:
        nxt = next((d for d in p.ranked() if d not in tried and p.cap[d] > 0), None)
        if nxt is None:
            break
        tried.add(nxt)
        takes = p.fill(nxt, min(remaining, p.cap[nxt]), partial=True) or []
        got = sum(g for _, splits in takes for _, g in splits)
        if got:
            placed_by_domain.append((nxt, takes))
            p.used.add(nxt)
            remaining -= got
    if remaining > 0:
        funded = active - remaining
        p.rollback(mark)
        room = sum(p.physical_room().values())
        reason = PackFailure.NO_FUNDED_CAPACITY if room >= active else PackFailure.NO_CAPACITY
        return NoFit(
            reason,
            f"needs {active} GPUs; offers can pay for {funded} placeable GPUs, "
            f"{room} {p.flavor} GPUs free in the requested location",
        )
    result = _node_groups(p, placed_by_domain, spares, first_group, first_rank, True)
    if result is None:
        p.rollback(mark)
        return NoFit(
            PackFailure.NO_CAPACITY,
            f"placed {active} GPUs but found no room for {spares} spares per node slice",
        )
    return result


def _node_groups(
    p: _Packer,
    placed: Sequence[tuple[DomainKey, list[_Take]]],
    spares: int,
    first_group: int,
    first_rank: int,
    elsewhere: bool,
) -> Placement | None:
    groups: list[GroupPlacement] = []
    index, rank = first_group, first_rank
    for dom, takes in placed:
        for take in takes:
            spare_takes = p.spares(dom, spares, {take[0].name}, elsewhere)
            if spare_takes is None:
                return None
            active_slices, next_rank = _slices(p, [take], Role.ACTIVE, index, rank)
            spare_slices, _ = _slices(p, spare_takes, Role.SPARE, index, rank)
            groups.append(GroupPlacement(index, dom, tuple(active_slices + spare_slices)))
            index, rank = index + 1, next_rank
    return Placement(groups=tuple(groups))


def fits(placement: Placement | NoFit) -> TypeGuard[Placement]:
    """Narrowing helper for callers: True for a Placement."""
    return isinstance(placement, Placement)


__all__ = [
    "GroupPlacement",
    "NoFit",
    "PackFailure",
    "PlacedSlice",
    "Placement",
    "fits",
    "group_sizes",
    "needs_more_offers",
    "pack",
]
