"""The budget family tree: who is owner, sibling, parent or cousin of whom.

Cover (SPEC §3) funds a Run from relatives in a fixed structural order instead of numeric
priorities, so the tree must answer "who is related how" deterministically.

**The family is the tree of Budgets that exist** (SPEC §2). Owners are colon-separated paths
(``org:ai:rai:sys``), but a path alone relates nobody. The nodes of the tree are the owners that
have at least one Budget; a node's direct parents are

* the owners its Budgets name in ``spec.parents`` (those that have a Budget), else
* its path parent (owner minus its last ``:`` segment) when a Budget with that owner exists.

An owner without a Budget links nothing: ``org:ai:a`` and ``org:ai:b`` are strangers unless a
Budget for ``org:ai`` exists or one of them names the other's parent in ``spec.parents``, and the
shared prefix ``org`` of every owner relates nobody without a Budget for ``org``. Money moves
between strangers only by lending (cover's sponsor step). A path parent is only the *immediate*
one: skipping a level (``org:ai:rai:sys`` under ``org:ai`` with no ``org:ai:rai`` Budget) takes an
explicit ``spec.parents``. Explicit parents may name several owners, so the tree is really a DAG;
every query below is defined for that general case.

Relation rules (documented in ``docs/engine-cover.md``):

* ``parents_of`` — every ancestor, nearest first (breadth-first over direct parents), then by name.
* ``siblings_of`` — owners sharing at least one direct parent, minus the owner and its ancestors,
  sorted by name.
* ``cousins_of`` — everyone else sharing an ancestor with the owner, *including the owner's own
  descendants* (a child's money is still the family's money). Ordered by the nearest common
  ancestor: first by the owner's distance up to it, then the relative's distance up to it, then
  name. Descendants therefore come first (their common ancestor is the owner itself), then
  nephews, then first cousins, and so on.

The index is immutable (decisions read it from a frozen snapshot) but cheap to advance:
:meth:`Family.updated` applies Budget events and keeps every memoised relation that the event
cannot have changed, so a watch cache never rebuilds it per decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.engine.model import AggregateCap, Budget, Envelope

_T = TypeVar("_T")
_MEMO_LIMIT = 4096
"""Derived views kept per index (``cached``); beyond it the oldest half is dropped."""


def path_parent(owner: str) -> tuple[str, ...]:
    """The owner path minus its last ``:`` segment (none for a root); a parent only if budgeted."""
    head, sep, _ = owner.rpartition(":")
    return (head,) if sep and head else ()


@dataclass(frozen=True, slots=True)
class Relatives:
    """Everyone related to one owner, split by the relation cover cares about."""

    owner: str
    parents: tuple[str, ...]
    siblings: tuple[str, ...]
    cousins: tuple[str, ...]

    @property
    def members(self) -> frozenset[str]:
        """The owner and every relative (built on demand: ``Family.is_family`` answers cheaper)."""
        return frozenset((self.owner, *self.parents, *self.siblings, *self.cousins))


Keyed = tuple[tuple[str, Envelope], ...]
"""Envelopes paired with their keys (``Envelope.key`` is computed; cover's hot loop reuses it)."""


@dataclass(frozen=True, slots=True)
class Candidates:
    """One owner's relatives' envelopes of one flavor, by relation, in relation order."""

    own: Keyed
    siblings: Keyed
    parents: Keyed
    cousins: Keyed


def _explicit(budgets: Iterable[Budget]) -> tuple[str, ...]:
    """One owner's pooled ``spec.parents`` (its own name excluded), in first-named order."""
    seen: list[str] = []
    for budget in budgets:
        seen.extend(p for p in budget.parents if p not in seen and p != budget.owner)
    return tuple(seen)


def _tree(budgets: Iterable[Budget]) -> dict[str, tuple[str, ...]]:
    """Direct parents of every budgeted owner under the rule above (the tree's whole shape)."""
    by_owner: dict[str, list[Budget]] = {}
    for budget in budgets:
        by_owner.setdefault(budget.owner, []).append(budget)
    tree: dict[str, tuple[str, ...]] = {}
    for owner in sorted(by_owner):
        named = _explicit(by_owner[owner])
        candidates = named if named else path_parent(owner)
        tree[owner] = tuple(p for p in candidates if p in by_owner)
    return tree


class Family:
    """Immutable index over a set of Budgets; queries are memoised per owner."""

    __slots__ = (
        "_all",
        "_budgets",
        "_by_name",
        "_by_owner",
        "_candidates",
        "_caps",
        "_caps_for",
        "_children",
        "_envelopes",
        "_flavored",
        "_known",
        "_memo",
        "_owner_budgets",
        "_parents",
        "_relatives",
        "_up",
    )

    def __init__(self, budgets: Iterable[Budget]) -> None:
        by_name: dict[str, Budget] = {}
        for budget in budgets:
            by_name[budget.name] = budget
        self._by_name = by_name
        self._budgets: tuple[Budget, ...] = tuple(by_name[n] for n in sorted(by_name))
        self._envelopes: dict[str, Envelope] = {}
        self._caps_for: dict[str, tuple[AggregateCap, ...]] = {}
        owner_budgets: dict[str, list[Budget]] = {}
        for budget in self._budgets:
            self._add(budget)
            owner_budgets.setdefault(budget.owner, []).append(budget)
        self._owner_budgets = {o: tuple(bs) for o, bs in owner_budgets.items()}
        self._by_owner = {
            o: tuple(e for b in bs for e in b.envelopes) for o, bs in self._owner_budgets.items()
        }
        self._shape()
        self._all: tuple[Envelope, ...] | None = None
        self._caps: tuple[AggregateCap, ...] | None = None
        self._up: dict[str, dict[str, int]] = {}
        self._relatives: dict[str, Relatives] = {}
        self._flavored: dict[tuple[str, str], Keyed] = {}
        self._candidates: dict[tuple[str, str], Candidates] = {}
        self._memo: dict[Any, Any] = {}

    def _add(self, budget: Budget) -> None:
        """Index one Budget's envelopes and caps (duplicate keys are an error)."""
        for env in budget.envelopes:
            if env.key in self._envelopes:
                raise ValueError(f"duplicate envelope key {env.key!r}")
            self._envelopes[env.key] = env
        seen: set[str] = set()
        for cap in budget.caps:
            if cap.key in seen:
                raise ValueError(f"duplicate aggregate cap key {cap.key!r}")
            seen.add(cap.key)
            for ref in cap.envelopes:
                key = ref if "/" in ref else f"{cap.budget}/{ref}"
                both = (*self._caps_for.get(key, ()), cap)
                self._caps_for[key] = tuple(sorted(both, key=lambda c: c.budget))  # stable

    def _drop(self, budget: Budget) -> None:
        for env in budget.envelopes:
            self._envelopes.pop(env.key, None)
        for cap in budget.caps:
            for ref in cap.envelopes:
                key = ref if "/" in ref else f"{cap.budget}/{ref}"
                left = tuple(c for c in self._caps_for.get(key, ()) if c is not cap)
                if left:
                    self._caps_for[key] = left
                else:
                    self._caps_for.pop(key, None)

    def _shape(self) -> None:
        """The tree: direct parents of every budgeted owner, and children."""
        self._parents = _tree(self._budgets)
        self._known: tuple[str, ...] = tuple(self._parents)
        children: dict[str, list[str]] = {}
        for owner, parents in self._parents.items():
            for parent in parents:
                children.setdefault(parent, []).append(owner)
        self._children: dict[str, tuple[str, ...]] = {p: tuple(c) for p, c in children.items()}

    def updated(self, upserts: Iterable[Budget] = (), deletes: Iterable[str] = ()) -> Family:
        """A new index with Budgets added/replaced (by name) and removed; ``self`` is unchanged.

        Incremental: only the touched Budgets' envelopes, caps and owners are re-indexed; the tree
        is re-derived only when its shape (the set of owners, a touched owner's ``spec.parents``)
        changed, and then every relation survives when the shape came out the same — the common
        case of an envelope's concurrency or window changing. Envelope lists survive for owners
        the event did not touch; derived views (``cached``, ``candidates``) start afresh.
        """
        by_name = dict(self._by_name)
        old: list[Budget] = []
        new_budgets: list[Budget] = []
        for name in deletes:
            gone = by_name.pop(name, None)
            if gone is not None:
                old.append(gone)
        for budget in upserts:
            prev = by_name.get(budget.name)
            if prev is not None:
                old.append(prev)
            by_name[budget.name] = budget
            new_budgets.append(budget)
        touched = {b.owner for b in (*old, *new_budgets)}
        new = Family.__new__(Family)
        new._by_name = by_name
        new._budgets = tuple(by_name[n] for n in sorted(by_name))
        new._envelopes = dict(self._envelopes)
        new._caps_for = dict(self._caps_for)
        for budget in old:
            new._drop(budget)
        for budget in new_budgets:
            new._add(budget)
        owner_budgets = dict(self._owner_budgets)
        for owner in touched:
            mine = tuple(b for b in new._budgets if b.owner == owner)
            if mine:
                owner_budgets[owner] = mine
            else:
                owner_budgets.pop(owner, None)
        new._owner_budgets = owner_budgets
        new._by_owner = dict(self._by_owner)
        for owner in touched:
            if owner in owner_budgets:
                new._by_owner[owner] = tuple(e for b in owner_budgets[owner] for e in b.envelopes)
            else:
                new._by_owner.pop(owner, None)
        same_shape = owner_budgets.keys() == self._owner_budgets.keys() and all(
            _explicit(owner_budgets[o]) == _explicit(self._owner_budgets[o])
            for o in touched
            if o in owner_budgets
        )
        if same_shape:
            new._parents, new._known, new._children = self._parents, self._known, self._children
        else:
            new._shape()
        new._all = None
        new._caps = None
        new._memo = {}
        new._candidates = {}
        if new._parents == self._parents:
            new._up = self._up
            new._relatives = self._relatives
            new._flavored = {k: v for k, v in self._flavored.items() if k[0] not in touched}
        else:
            new._up, new._relatives, new._flavored = {}, {}, {}
        return new

    def cached(self, key: Any, compute: Callable[[], _T]) -> _T:
        """A view derived from these Budgets only, computed once per index (cover's orders)."""
        try:
            value: _T = self._memo[key]
        except KeyError:
            if len(self._memo) >= _MEMO_LIMIT:
                for old in list(self._memo)[: _MEMO_LIMIT // 2]:
                    del self._memo[old]
            value = self._memo[key] = compute()
        return value

    # -- plain lookups -------------------------------------------------------------------------

    @property
    def budgets(self) -> tuple[Budget, ...]:
        """The budgets, sorted by name."""
        return self._budgets

    def owners(self) -> tuple[str, ...]:
        """Owners that have a Budget (the tree's nodes), sorted."""
        return self._known

    def envelopes_of(self, owner: str) -> tuple[Envelope, ...]:
        """The owner's envelopes in budget-name then declaration order."""
        return self._by_owner.get(owner, ())

    def envelope(self, key: str) -> Envelope:
        """Envelope by ``budget/name`` key; KeyError when unknown."""
        return self._envelopes[key]

    def all_envelopes(self) -> tuple[Envelope, ...]:
        """Every envelope in budget-name then declaration order."""
        if self._all is None:
            self._all = tuple(e for b in self._budgets for e in b.envelopes)
        return self._all

    def caps(self) -> tuple[AggregateCap, ...]:
        """Every aggregate cap in budget-name then declaration order."""
        if self._caps is None:
            self._caps = tuple(c for b in self._budgets for c in b.caps)
        return self._caps

    def caps_for(self, envelope_key: str) -> tuple[AggregateCap, ...]:
        """Aggregate caps that bound this envelope together with others."""
        return self._caps_for.get(envelope_key, ())

    def direct_parents(self, owner: str) -> tuple[str, ...]:
        """Budgeted owners named in spec.parents, else the path parent if it has a Budget."""
        return self._parents.get(owner, ())

    def children_of(self, owner: str) -> tuple[str, ...]:
        """Owners naming this owner as a direct parent, sorted."""
        return self._children.get(owner, ())

    def flavored(self, owner: str, flavor: str) -> Keyed:
        """The owner's envelopes of one flavor with their keys, in envelope order (memoised)."""
        cached = self._flavored.get((owner, flavor))
        if cached is None:
            cached = tuple((e.key, e) for e in self.envelopes_of(owner) if e.flavor == flavor)
            self._flavored[(owner, flavor)] = cached
        return cached

    def candidates(self, owner: str, flavor: str) -> Candidates:
        """Envelopes cover may draw on before sponsors, grouped by relation (memoised)."""
        cached = self._candidates.get((owner, flavor))
        if cached is None:
            rel = self.relatives(owner)

            def of(owners: tuple[str, ...]) -> Keyed:
                return tuple(kv for o in owners for kv in self.flavored(o, flavor))

            cached = Candidates(
                own=self.flavored(owner, flavor),
                siblings=of(rel.siblings),
                parents=of(rel.parents),
                cousins=of(rel.cousins),
            )
            self._candidates[(owner, flavor)] = cached
        return cached

    # -- relations ----------------------------------------------------------------------------

    def parents_of(self, owner: str) -> tuple[str, ...]:
        """Ancestors nearest first, ties by name."""
        return self.relatives(owner).parents

    def siblings_of(self, owner: str) -> tuple[str, ...]:
        """Owners with a common direct parent, excluding the owner and its ancestors."""
        return self.relatives(owner).siblings

    def cousins_of(self, owner: str) -> tuple[str, ...]:
        """Other family (descendants included), nearest common ancestor first."""
        return self.relatives(owner).cousins

    def descendants_of(self, owner: str) -> tuple[str, ...]:
        """Owners below this one in the tree (children, grandchildren, …), sorted."""
        seen: set[str] = set()
        stack = list(self.children_of(owner))
        while stack:
            child = stack.pop()
            if child not in seen and child != owner:
                seen.add(child)
                stack.extend(self.children_of(child))
        return tuple(sorted(seen))

    def is_family(self, owner: str, other: str) -> bool:
        """True when ``other`` is the owner or any relative (shares an ancestor or descends).

        Relatives are exactly the owners whose ancestors-or-self meet the owner's, so the answer
        needs two short ancestor walks, never a set of the whole family per owner.
        """
        if owner == other:
            return True
        return not self._distances_up(owner).keys().isdisjoint(self._distances_up(other))

    def relatives(self, owner: str) -> Relatives:
        """All three relation lists at once (memoised: cover asks for them on every call)."""
        cached = self._relatives.get(owner)
        if cached is not None:
            return cached
        up = self._distances_up(owner)
        parents = tuple(sorted((a for a in up if a != owner), key=lambda a: (up[a], a)))
        excluded = {owner, *parents}
        sibs: set[str] = set()
        for parent in self.direct_parents(owner):
            sibs.update(c for c in self._children.get(parent, ()) if c not in excluded)
        siblings = tuple(sorted(sibs))
        excluded.update(siblings)
        cousins = tuple(self._ranked_relatives(up, excluded))
        rel = Relatives(owner=owner, parents=parents, siblings=siblings, cousins=cousins)
        self._relatives[owner] = rel
        return rel

    def _ranked_relatives(self, up: dict[str, int], excluded: set[str]) -> list[str]:
        """Owners below any ancestor, keyed by (distance up, distance down) to the nearest one.

        Ancestors are walked nearest first; a breadth-first walk down from each stops at owners a
        nearer ancestor already reached, so the whole family is visited about once.
        """
        best: dict[str, tuple[int, int]] = {}
        for anc in sorted(up, key=lambda a: (up[a], a)):
            du = up[anc]
            frontier = [anc]
            depth = 0
            while frontier:
                depth += 1
                nxt: list[str] = []
                for node in frontier:
                    for child in self._children.get(node, ()):
                        prev = best.get(child)
                        if prev is not None and prev <= (du, depth):
                            continue
                        best[child] = (du, depth)
                        nxt.append(child)
                frontier = nxt
        ranked = sorted((k[0], k[1], o) for o, k in best.items() if o not in excluded)
        return [r[2] for r in ranked]

    def _distances_up(self, owner: str) -> dict[str, int]:
        """Breadth-first distance from the owner (0) to each ancestor; cycle-safe."""
        cached = self._up.get(owner)
        if cached is not None:
            return cached
        dist = {owner: 0}
        frontier = [owner]
        while frontier:
            nxt: list[str] = []
            for node in frontier:
                for parent in self.direct_parents(node):
                    if parent not in dist:
                        dist[parent] = dist[node] + 1
                        nxt.append(parent)
            frontier = nxt
        self._up[owner] = dist
        return dist
