"""Wire payloads: one msgspec Struct per subject (see ``shared.bus.subjects`` for which is which).

The structs are the typed contract between the five services. They are frozen and reject unknown
fields, so a sender built against another schema fails loudly at the receiver (and lands on the
dead-letter subject) instead of being half-understood. There is no version field: the subject name
carries the version (``jobtree.v1.*``), and a breaking change gets a new subject.

Engine values (``RunRequest``, ``Funding``, ``Placement``, ``LeaseIntent``, ``PodIntent``) travel
as they are, so a service never re-invents a parallel wire twin of a decision the engine made.
msgspec encodes those frozen dataclasses field by field; note that it ignores (rather than rejects)
unknown fields *inside* them — strictness is enforced on the envelope structs here.

The encoding is JSON: readable with ``nats sub``/``nats req`` while debugging, and fast enough with
msgspec. Use :func:`encode` and :func:`decode` rather than msgspec directly, because the engine's
read-only mappings (``MappingProxyType``) need a hook to encode.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, TypeVar

import msgspec

from shared.engine.bindplan import LeaseIntent, PodIntent
from shared.engine.model import DomainKey, RunKey, RunRequest
from shared.engine.offers import Funding
from shared.engine.pack import Placement

T = TypeVar("T")


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every wire payload: immutable and strict about unknown fields."""


# --------------------------------------------------------------------------- shared pieces


class RunRef(Message, frozen=True, forbid_unknown_fields=True):
    """Which Run (and which spec of it) a message is about; ``generation`` detects stale work."""

    namespace: str
    name: str
    uid: str
    generation: int

    @property
    def key(self) -> RunKey:
        """The engine's ``(namespace, name)`` key."""
        return (self.namespace, self.name)

    @classmethod
    def of(cls, run_obj: Mapping[str, Any]) -> RunRef:
        """The reference to a Run object as a watch cache holds it (missing fields empty)."""
        meta = run_obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
        )


# --------------------------------------------------------------------------- packer.plan


class PlanRequest(Message, frozen=True, forbid_unknown_fields=True):
    """Ask the packer where a covered Run would go on its current topology view.

    The fields after ``funding`` mirror ``shared.engine.pack.pack``'s keyword arguments (growing a
    malleable Run starts at ``first_group``/``first_rank`` and prefers ``used_domains``);
    ``own_claim`` names the Reservation whose protected capacity this Run may use.
    """

    run: RunRef
    request: RunRequest
    funding: Funding
    gpus: int | None = None
    first_group: int = 0
    first_rank: int = 0
    used_domains: list[DomainKey] = msgspec.field(default_factory=list)
    own_claim: str | None = None
    at: datetime | None = None


class PlanReply(Message, frozen=True, forbid_unknown_fields=True):
    """A placement, or why there is none (``reason``/``message`` from ``NoFit``).

    ``version`` is the packer's topology cache version the plan was computed on; it goes into the
    commit so the binder can reject a plan made on a stale view.
    """

    version: int
    placement: Placement | None = None
    reason: str = ""
    message: str = ""

    @property
    def fits(self) -> bool:
        return self.placement is not None


# --------------------------------------------------------------------------- binder.commit


class LeaseEnd(Message, frozen=True, forbid_unknown_fields=True):
    """Close one open Lease with a closure reason (``shared.engine.model.Closure`` value)."""

    name: str
    closure: str


class CommitRequest(Message, frozen=True, forbid_unknown_fields=True):
    """One atomic commit for the binder: lease ends and starts that belong together, all or none.

    ``key`` is the idempotency key: re-sending the same commit is a no-op. ``version`` is the
    snapshot version the proposal was computed on; the binder rejects stale ones.
    ``budget_of`` maps each envelope key a lease names to its Budget object name.
    """

    key: str
    run: RunRef
    version: int
    leases: list[LeaseIntent] = msgspec.field(default_factory=list)
    pods: list[PodIntent] = msgspec.field(default_factory=list)
    ends: list[LeaseEnd] = msgspec.field(default_factory=list)
    budget_of: dict[str, str] = msgspec.field(default_factory=dict)
    reason: str = ""


class CommitReply(Message, frozen=True, forbid_unknown_fields=True):
    """Outcome of a commit; ``conflict`` says why it was rejected (proposer recomputes)."""

    ok: bool
    conflict: str = ""
    created: list[str] = msgspec.field(default_factory=list)
    ended: list[str] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------------- forecast.reserve


class ReserveRequest(Message, frozen=True, forbid_unknown_fields=True):
    """A Run cannot start now: plan a Reservation. Fields after ``stage`` come from ``Blocked``."""

    run: RunRef
    request: RunRequest
    stage: str
    reason: str
    message: str
    shortfall: int


class ReserveReply(Message, frozen=True, forbid_unknown_fields=True):
    """The Reservation made (object name), its computed ETA and what that ETA rests on."""

    reservation: str
    earliest_start: datetime
    confidence: str


# --------------------------------------------------------------------------- resolver.activate


class ActivateRequest(Message, frozen=True, forbid_unknown_fields=True):
    """A Reservation reached ``earliestStart``: resolve contention and bind it.

    ``at`` is the activation instant; with the reservation ``uid`` it seeds the lottery, so the
    same request always replays the same draw.
    """

    namespace: str
    name: str
    uid: str
    at: datetime


class ActivateReply(Message, frozen=True, forbid_unknown_fields=True):
    """Whether the Reservation was released; ``seed`` is set whenever a lottery ran."""

    released: bool
    seed: str | None
    message: str


# --------------------------------------------------------------------------- events


class NodeFailed(Message, frozen=True, forbid_unknown_fields=True):
    """The packer saw a node fail under its topology view (durable: must reach the resolver)."""

    node: str
    at: datetime
    reason: str


class LedgerEvent(Message, frozen=True, forbid_unknown_fields=True):
    """A Lease opened or closed (durable): budgets and forecasts refresh from these."""

    kind: Literal["opened", "closed"]
    lease: str
    run: RunKey
    envelope: str
    gpus: int
    at: datetime
    closure: str = ""


class RunChanged(Message, frozen=True, forbid_unknown_fields=True):
    """A nudge for admission to look at a Run again now (instead of at its next resync)."""

    namespace: str
    name: str


class DeadLetter(Message, frozen=True, forbid_unknown_fields=True):
    """A payload a service could not decode (or kept failing on), kept verbatim for inspection."""

    subject: str
    service: str
    error: str
    payload: bytes


# --------------------------------------------------------------------------- codec


def _enc_hook(obj: Any) -> Any:
    """Encode read-only mappings (the engine's ``MappingProxyType`` defaults) as plain objects."""
    if isinstance(obj, Mapping):
        return dict(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)


_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    found = _DECODERS.get(type_)
    if found is None:
        found = _DECODERS[type_] = msgspec.json.Decoder(type_)
    return found


def encode(msg: object) -> bytes:
    """JSON bytes of a message (or of any engine value it embeds)."""
    return _ENCODER.encode(msg)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode strictly into ``type_``; raises ``msgspec.DecodeError`` (or its subclass
    ``msgspec.ValidationError``) on malformed JSON, wrong types or unknown fields."""
    result: T = _decoder(type_).decode(data)
    return result


__all__ = [
    "ActivateReply",
    "ActivateRequest",
    "CommitReply",
    "CommitRequest",
    "DeadLetter",
    "LeaseEnd",
    "LedgerEvent",
    "Message",
    "NodeFailed",
    "PlanReply",
    "PlanRequest",
    "ReserveReply",
    "ReserveRequest",
    "RunChanged",
    "RunRef",
    "decode",
    "encode",
]
