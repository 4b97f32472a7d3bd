"""Wire payloads: one msgspec Struct per subject (see ``shared.bus.subjects`` for which is which).

The structs are the typed contract between the five services. They are frozen and reject unknown
fields, so a sender built against another schema fails loudly at the receiver (and lands on the
dead-letter subject) instead of being half-understood. There is no version field: the subject name
carries the version (``jobtree.v1.*``), and a breaking change gets a new subject.

Engine values (``RunRequest``, ``Funding``, ``Placement``, ``LeaseIntent``, ``PodIntent``) travel
as they are, so a service never re-invents a parallel wire twin of a decision the engine made.
msgspec encodes those frozen dataclasses field by field but would ignore unknown fields inside
them, so :func:`decode` walks the payload against the declared types and refuses an unknown field
at any depth exactly like one at the top (``Object contains unknown field `x` - at `$.path```).

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

    ``key`` is the idempotency key: re-sending the same commit is a no-op, and the binder refuses
    the key when it comes back with other content (``KeyReused``). ``version`` is the proposer's
    cache version, recorded for diagnosis only: each service counts its own, so the binder judges
    staleness by what the commit would do to its own view (``shared.control.commit_check``) and
    whether it can justify every write (``shared.control.commit_trust``), not by this number.
    ``run.uid`` is required for a commit that starts anything. ``budget_of`` maps each envelope
    key a lease names to its Budget object name.
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

    It carries no time: the activation instant that seeds the lottery is the Reservation's own
    ``status.activatedAt`` (written once), so whoever sends the request cannot choose the draw.
    """

    namespace: str
    name: str
    uid: str


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


_INFO: dict[Any, msgspec.inspect.Type] = {}
_NESTED: dict[Any, bool] = {}
_RAW = msgspec.json.Decoder()


def _info(type_: Any) -> msgspec.inspect.Type:
    found = _INFO.get(type_)
    if found is None:
        found = _INFO[type_] = msgspec.inspect.type_info(type_)
    return found


def _children(info: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type, ...]:
    """The types directly inside a container, union or object type."""
    mi = msgspec.inspect
    if isinstance(info, mi.DataclassType | mi.StructType):
        return tuple(f.type for f in info.fields)
    if isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return (info.item_type,)
    if isinstance(info, mi.TupleType):
        return tuple(info.item_types)
    if isinstance(info, mi.DictType):
        return (info.value_type,)
    if isinstance(info, mi.UnionType):
        return tuple(info.types)
    return ()


def _has_dataclass(info: msgspec.inspect.Type, seen: frozenset[int] = frozenset()) -> bool:
    """Whether a dataclass (lenient about unknown fields) sits anywhere inside ``info``."""
    if isinstance(info, msgspec.inspect.DataclassType):
        return True
    if id(info) in seen:
        return False
    inner = seen | {id(info)}
    return any(_has_dataclass(child, inner) for child in _children(info))


def _unknown_field(raw: Any, info: msgspec.inspect.Type, path: str) -> str | None:
    """The first unknown field of ``raw`` against ``info`` (JSON path), None when all are known.

    Only the shape is walked here; types and values are the typed decoder's to judge.
    """
    mi = msgspec.inspect
    if isinstance(info, mi.DataclassType | mi.StructType):
        if not isinstance(raw, dict):
            return None
        fields = {f.encode_name: f for f in info.fields}
        for name in raw:
            if name not in fields:
                return f"Object contains unknown field `{name}` - at `{path}`"
        for name, value in raw.items():
            bad = _unknown_field(value, fields[name].type, f"{path}.{name}")
            if bad is not None:
                return bad
        return None
    if isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        if isinstance(raw, list):
            for i, item in enumerate(raw):
                bad = _unknown_field(item, info.item_type, f"{path}[{i}]")
                if bad is not None:
                    return bad
        return None
    if isinstance(info, mi.TupleType):
        if isinstance(raw, list):
            for i, (item, sub) in enumerate(zip(raw, info.item_types, strict=False)):
                bad = _unknown_field(item, sub, f"{path}[{i}]")
                if bad is not None:
                    return bad
        return None
    if isinstance(info, mi.DictType):
        if isinstance(raw, dict):
            for key, value in raw.items():
                bad = _unknown_field(value, info.value_type, f"{path}[{key!r}]")
                if bad is not None:
                    return bad
        return None
    if isinstance(info, mi.UnionType) and isinstance(raw, dict | list):
        for member in info.types:
            if isinstance(raw, dict) == isinstance(member, mi.DataclassType | mi.StructType):
                return _unknown_field(raw, member, path)
    return None


def decode(data: bytes, type_: type[T]) -> T:
    """Decode strictly into ``type_``; raises ``msgspec.DecodeError`` (or its subclass
    ``msgspec.ValidationError``) on malformed JSON, wrong types or unknown fields at any depth."""
    result: T = _decoder(type_).decode(data)
    nested = _NESTED.get(type_)
    if nested is None:
        nested = _NESTED[type_] = _has_dataclass(_info(type_))
    if nested:
        bad = _unknown_field(_RAW.decode(data), _info(type_), "$")
        if bad is not None:
            raise msgspec.ValidationError(bad)
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
