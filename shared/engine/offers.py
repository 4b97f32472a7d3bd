"""What cover hands to pack: the envelopes willing to pay for a Run, in cover order.

Cover (``shared.engine.cover``) decides *who may pay and how much*; pack decides *where* and splits
each placed slice across these offers. Keeping the hand-over in its own tiny module lets both sides
depend on it without depending on each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from shared.engine.model import DOMAIN_LABELS, FLAVOR_LABEL, Envelope, FundingKind, Selector

_DOMAIN_LEVEL = frozenset((*DOMAIN_LABELS, FLAVOR_LABEL))


def has_node_keys(selector: Selector) -> bool:
    """True when the selector names a label below the domain (a rack, a node label).

    Such a payer pays only on some nodes of a domain, so which nodes pack may use depends on every
    offer, not only on the first ones that can fund the Run.
    """
    return any(k not in _DOMAIN_LEVEL for k in selector)


@dataclass(frozen=True, slots=True)
class Offer:
    """One envelope willing to pay, listed in cover order (earlier offers are charged first)."""

    envelope: Envelope
    gpus: int
    """Most GPUs this envelope can pay for this Run right now (headroom after all its limits)."""
    kind: FundingKind
    caps: tuple[str, ...] = ()
    """Keys of shared limits this offer also draws on (aggregate caps, a lender's sub-cap, the
    Run's borrow limit); their remaining GPUs live in ``Funding.caps``."""

    @property
    def key(self) -> str:
        """The paying envelope's cluster-unique key (``budget/name``)."""
        return self.envelope.key


def _frozen_caps() -> Mapping[str, int]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Funding:
    """Result of a successful cover: the offers plus the shared limits they draw on.

    A cap key named by an offer but absent from ``caps`` is treated as unbounded by pack: cover is
    expected to list every key it hands out.
    """

    offers: tuple[Offer, ...]
    caps: Mapping[str, int] = field(default_factory=_frozen_caps)
    complete: bool = True
    """False when cover stopped pricing once these offers could fund the demand: later offers in
    cover order exist. Pack then answers ``NeedsMoreOffers`` whenever its plan could depend on
    them, and the caller covers again with ``complete=True``."""

    @property
    def total(self) -> int:
        """Upper bound of the GPUs these offers can fund together.

        It is the plain sum of the offers: shared caps and selectors can only lower what is really
        fundable, and pack discovers that exactly while it assigns payers. Use it to fail fast,
        never as a promise.
        """
        return sum(max(0, o.gpus) for o in self.offers)

    def cap_left(self, key: str) -> int | None:
        """Remaining GPUs under a shared limit, ``None`` when the limit is not bounded."""
        return self.caps.get(key)


NO_FUNDING = Funding(offers=())
"""Funding with no offers: pack can place nothing with it."""
