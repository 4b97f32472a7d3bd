"""The subject catalog: every NATS subject Jobtree uses, its payload type and who talks on it.

This module is the single place a subject name is spelled; services import the constants and pass
them to ``ServiceRuntime``, which derives decoding, replies and durability from them. The table in
``docs/subjects.md`` is checked against ``CATALOG`` by the tests.

Naming: ``jobtree.v1.<owner service>.<verb>`` for request/reply endpoints (the owner answers),
``jobtree.v1.events.<topic>`` for events. A payload change that old readers cannot decode gets a
new version token (``jobtree.v2.…``), never an in-place edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shared.bus.messages import (
    ActivateReply,
    ActivateRequest,
    CommitReply,
    CommitRequest,
    DeadLetter,
    LedgerEvent,
    NodeFailed,
    PlanReply,
    PlanRequest,
    ReserveReply,
    ReserveRequest,
    RunChanged,
)

Req = TypeVar("Req")
Rep = TypeVar("Rep")

PREFIX = "jobtree.v1"
DEADLETTER_PREFIX = f"{PREFIX}.deadletter"

SERVICES: tuple[str, ...] = ("admission", "packer", "forecast", "resolver", "binder")
"""Every Jobtree service, in start order (the binder, the only writer, starts last). Each one is
also a bus identity: its own NATS user with exactly the permissions ``shared.bus.auth`` derives
from this catalog."""
OPERATOR = "operator"
"""The read-only identity of a human with the ``nats`` CLI: dead letters, streams, ``$SRV``."""
IDENTITIES: tuple[str, ...] = (*SERVICES, OPERATOR)


def inbox_prefix(identity: str) -> str:
    """The reply-inbox prefix of one identity (``_INBOX.binder``): replies to its requests, its
    JetStream acks and fetches arrive under it, and nobody else may subscribe there."""
    return f"_INBOX.{identity}"


@dataclass(frozen=True)
class Subject(Generic[Req, Rep]):
    """One subject: its name, the payload type, the reply type (``None`` for events) and whether
    its messages are kept in a JetStream stream so they survive a consumer's restart."""

    name: str
    request: type[Req]
    reply: type[Rep] | None
    durable: bool = False
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    doc: str = ""

    @property
    def is_event(self) -> bool:
        return self.reply is None

    @property
    def is_wildcard(self) -> bool:
        return any(t in ("*", ">") for t in self.name.split("."))

    @property
    def endpoint_name(self) -> str:
        """Name of the ``nats.micro`` endpoint serving this subject (``packer-plan``)."""
        return self.name.removeprefix(f"{PREFIX}.").replace(".", "-")


# --------------------------------------------------------------------------- request / reply

PLAN: Subject[PlanRequest, PlanReply] = Subject(
    f"{PREFIX}.packer.plan",
    PlanRequest,
    PlanReply,
    producers=("admission", "resolver"),
    consumers=("packer",),
    doc="Where would this covered Run go now? Placement or NoFit reason, with the cache version.",
)

COMMIT: Subject[CommitRequest, CommitReply] = Subject(
    f"{PREFIX}.binder.commit",
    CommitRequest,
    CommitReply,
    producers=("admission", "resolver"),
    consumers=("binder",),
    doc="One atomic commit of lease ends + lease/pod starts; idempotent by key, versioned.",
)

RESERVE: Subject[ReserveRequest, ReserveReply] = Subject(
    f"{PREFIX}.forecast.reserve",
    ReserveRequest,
    ReserveReply,
    producers=("admission",),
    consumers=("forecast",),
    doc="Cover or pack failed now: create/refresh the Run's Reservation and compute its ETA.",
)

UNRESERVABLE = "422"
"""``RESERVE`` error code: no Reservation can serve this Run (e.g. its scope holds no node); the
error message is the typed reason (``NoNodesInScope: …``) to show on the Run."""

ACTIVATE: Subject[ActivateRequest, ActivateReply] = Subject(
    f"{PREFIX}.resolver.activate",
    ActivateRequest,
    ActivateReply,
    producers=("forecast",),
    consumers=("resolver",),
    doc="A Reservation reached earliestStart: cuts + seeded lottery, then bind it.",
)

# --------------------------------------------------------------------------- events

NODE_FAILED: Subject[NodeFailed, None] = Subject(
    f"{PREFIX}.events.node.failed",
    NodeFailed,
    None,
    durable=True,
    producers=("packer",),
    consumers=("resolver",),
    doc="A node under open leases failed: the resolver plans swaps / shrinks / requeues.",
)

LEDGER: Subject[LedgerEvent, None] = Subject(
    f"{PREFIX}.events.ledger",
    LedgerEvent,
    None,
    durable=True,
    producers=("binder",),
    consumers=("admission", "forecast"),
    doc="A Lease opened or closed: usage, headroom and forecasts refresh.",
)

RUN_CHANGED: Subject[RunChanged, None] = Subject(
    f"{PREFIX}.events.run.changed",
    RunChanged,
    None,
    producers=("resolver", "binder"),
    consumers=("admission",),
    doc="Nudge admission to re-evaluate a Run now; losing one only delays until the resync.",
)

DEADLETTER: Subject[DeadLetter, None] = Subject(
    f"{DEADLETTER_PREFIX}.>",
    DeadLetter,
    None,
    durable=True,
    producers=SERVICES,
    consumers=(OPERATOR,),
    doc="Payloads a service could not decode (or kept failing on), kept verbatim; each service "
    "dead-letters only the subjects it consumes.",
)

CATALOG: tuple[Subject[Any, Any], ...] = (
    PLAN,
    COMMIT,
    RESERVE,
    ACTIVATE,
    NODE_FAILED,
    LEDGER,
    RUN_CHANGED,
    DEADLETTER,
)


def deadletter_subject(original: str) -> str:
    """Where rejects of ``original`` go: ``jobtree.v1.deadletter.<original subject>``."""
    return f"{DEADLETTER_PREFIX}.{original}"


def deadletter_of(original: Subject[Any, Any]) -> Subject[DeadLetter, None]:
    """The concrete dead-letter subject of one subject, e.g. to subscribe to PLAN's rejects."""
    return Subject(
        deadletter_subject(original.name),
        DeadLetter,
        None,
        durable=True,
        producers=original.consumers,
        consumers=(OPERATOR,),
        doc=f"Rejects of {original.name}.",
    )


# --------------------------------------------------------------------------- JetStream


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream: created (idempotently) at start by each service that uses it; only its
    ``owner`` may change the configuration of an existing stream, and nobody may delete it."""

    name: str
    subjects: tuple[str, ...]
    max_age_seconds: float
    max_bytes: int
    users: tuple[str, ...]
    """The identities that create it at start (a create never changes an existing stream)."""
    owner: str = "binder"
    doc: str = ""


EVENTS_STREAM = StreamSpec(
    "JOBTREE_EVENTS",
    tuple(s.name for s in CATALOG if s.durable and s is not DEADLETTER),
    max_age_seconds=7 * 24 * 3600.0,
    max_bytes=1 << 30,
    users=SERVICES,
    doc="Events that must survive a consumer restart (ledger, node failures).",
)

DEADLETTER_STREAM = StreamSpec(
    "JOBTREE_DEADLETTER",
    (DEADLETTER.name,),
    max_age_seconds=7 * 24 * 3600.0,
    max_bytes=256 << 20,
    users=SERVICES,
    doc="Rejected payloads, kept a week for `nats stream view`.",
)

STREAMS: tuple[StreamSpec, ...] = (EVENTS_STREAM, DEADLETTER_STREAM)
"""The streams every service runtime ensures at start."""

JOURNAL_PREFIX = f"{PREFIX}.binder.journal"
JOURNAL_STREAM = StreamSpec(
    "JOBTREE_BINDER_JOURNAL",
    (f"{JOURNAL_PREFIX}.*",),
    max_age_seconds=0.0,
    max_bytes=-1,
    users=("binder",),
    doc="The binder's write-ahead journal of commits being applied (services/binder/journal.py): "
    "only the binder may write, read or purge it.",
)


def stream_of(subject: Subject[Any, Any]) -> StreamSpec:
    """The stream holding a durable subject's messages."""
    if not subject.durable:
        raise ValueError(f"{subject.name} is not durable: it has no stream")
    if subject.name.startswith(f"{DEADLETTER_PREFIX}."):
        return DEADLETTER_STREAM
    return EVENTS_STREAM


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def consumer_name(durable: str, subject: Subject[Any, Any]) -> str:
    """The JetStream durable consumer for (``durable``, subject), e.g. ``forecast--events-ledger``.

    Consumers are scoped by stream, and one stream carries several subjects, so the subject is part
    of the name: a service may use its own name as ``durable`` for every event it follows.
    """
    token = _UNSAFE.sub("_", subject.endpoint_name)
    return f"{_UNSAFE.sub('_', durable)}--{token}"
