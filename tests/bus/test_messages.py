"""The wire contract, without a server: every payload round-trips and strictness really bites."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec
import pytest

from shared.bus.messages import (
    ActivateReply,
    ActivateRequest,
    CommitReply,
    CommitRequest,
    DeadLetter,
    LeaseEnd,
    LedgerEvent,
    NodeFailed,
    PlanReply,
    PlanRequest,
    ReserveReply,
    ReserveRequest,
    RunChanged,
    RunRef,
    decode,
    encode,
)
from shared.bus.subjects import (
    CATALOG,
    COMMIT,
    DEADLETTER,
    EVENTS_STREAM,
    LEDGER,
    NODE_FAILED,
    PLAN,
    Subject,
    consumer_name,
    deadletter_of,
    deadletter_subject,
    stream_of,
)
from shared.engine.bindplan import LeaseIntent, PodIntent
from shared.engine.model import (
    Envelope,
    FundingKind,
    LeaseReason,
    Lending,
    Malleable,
    Role,
    RunRequest,
)
from shared.engine.offers import Funding, Offer
from shared.engine.pack import GroupPlacement, PlacedSlice, Placement

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "subjects.md"

RUN = RunRef(namespace="team-a", name="llm-pretrain", uid="5f0c-uid", generation=3)

REQUEST = RunRequest(
    key=("team-a", "llm-pretrain"),
    uid="5f0c-uid",
    owner="org:ai:rai",
    flavor="H100-80GB",
    total_gpus=16,
    group_gpus=8,
    allow_cross_group_spread=False,
    selector=MappingProxyType({"region": "us-west"}),
    spares_per_group=1,
    malleable=Malleable(min_gpus=8, max_gpus=32, step_gpus=8, desired_gpus=16),
    allow_borrow=True,
    max_borrow_gpus=8,
    sponsors=("org:ai:mm",),
    max_duration=timedelta(hours=12),
    checkpoint=timedelta(minutes=30),
    max_restarts=2,
)

ENVELOPE = Envelope(
    budget="rai-h100",
    owner="org:ai:rai",
    name="west",
    flavor="H100-80GB",
    selector=MappingProxyType({"region": "us-west", "cluster": "gpu-a"}),
    concurrency=64,
    max_gpu_hours=10_000.0,
    start=T0,
    end=T0 + timedelta(days=90),
    lending=Lending(allow=True, to=("org:ai:*",), max_concurrency=16),
)

FUNDING = Funding(
    offers=(Offer(envelope=ENVELOPE, gpus=24, kind=FundingKind.OWNED, caps=("rai-h100/total",)),),
    caps=MappingProxyType({"rai-h100/total": 48}),
)

PLACEMENT = Placement(
    groups=(
        GroupPlacement(
            index=0,
            domain=("us-west", "gpu-a", "nv-a"),
            slices=(
                PlacedSlice(
                    "n1", 8, Role.ACTIVE, 0, 0, "rai-h100/west", "org:ai:rai", FundingKind.OWNED
                ),
                PlacedSlice(
                    "n2", 1, Role.SPARE, 0, -1, "rai-h100/west", "org:ai:rai", FundingKind.OWNED
                ),
            ),
        ),
    )
)

LEASE = LeaseIntent(
    name="llm-pretrain-g0-r0-abc",
    run=("team-a", "llm-pretrain"),
    owner="org:ai:rai",
    node="n1",
    gpus=8,
    role=Role.ACTIVE,
    group=0,
    rank=0,
    envelope="rai-h100/west",
    payer_owner="org:ai:rai",
    funding=FundingKind.OWNED,
    start=T0,
    reason=LeaseReason.START,
    expected_end=T0 + timedelta(hours=12),
    comp_path=("org:ai:rai",),
)

POD = PodIntent(
    name="llm-pretrain-0",
    run=("team-a", "llm-pretrain"),
    node="n1",
    gpus=8,
    group=0,
    rank=0,
    role=Role.ACTIVE,
    world_size=16,
    master="llm-pretrain-0",
)

SAMPLES: list[Any] = [
    RUN,
    PlanRequest(
        run=RUN,
        request=REQUEST,
        funding=FUNDING,
        gpus=16,
        first_group=1,
        first_rank=8,
        used_domains=[("us-west", "gpu-a", "nv-a")],
        own_claim="llm-pretrain-res",
        at=T0,
    ),
    PlanRequest(run=RUN, request=REQUEST, funding=Funding(offers=())),
    PlanRequest(run=RUN, request=REQUEST, funding=Funding(offers=FUNDING.offers, complete=False)),
    PlanReply(version=41, placement=PLACEMENT),
    PlanReply(version=41, reason="NeedsMoreOffers", message="the plan depends on offers after 1"),
    PlanReply(version=41, reason="NoFundedCapacity", message="need 16, 8 funded"),
    LeaseEnd(name="old-lease", closure="Swap"),
    CommitRequest(
        key="commit-llm-pretrain-g3-a0",
        run=RUN,
        version=41,
        leases=[LEASE],
        pods=[POD],
        ends=[LeaseEnd(name="old-lease", closure="RandomPreempt")],
        budget_of={"rai-h100/west": "rai-h100"},
        reason="Start",
    ),
    CommitReply(ok=True, created=["llm-pretrain-g0-r0-abc"], ended=["old-lease"]),
    CommitReply(ok=False, conflict="stale version 40 < 41"),
    ReserveRequest(
        run=RUN,
        request=REQUEST,
        stage="pack",
        reason="NoFundedCapacity",
        message="8 GPUs short",
        shortfall=8,
    ),
    ReserveReply(reservation="llm-pretrain-res", earliest_start=T0, confidence="walltime"),
    ActivateRequest(namespace="team-a", name="llm-pretrain-res", uid="r-uid"),
    ActivateReply(released=True, seed="ab12" * 16, message="bound after 1 draw"),
    ActivateReply(released=False, seed=None, message="deficit 8 left"),
    NodeFailed(node="n7", at=T0, reason="NotReady"),
    LedgerEvent(
        kind="closed",
        lease="l1",
        run=("team-a", "llm-pretrain"),
        envelope="rai-h100/west",
        gpus=8,
        at=T0,
        closure="Completed",
    ),
    RunChanged(namespace="team-a", name="llm-pretrain"),
    DeadLetter(subject=PLAN.name, service="packer", error="bad", payload=b"{not json\x00\xff"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Any) -> None:
    data = encode(msg)
    again = decode(data, type(msg))
    assert again == msg
    assert encode(again) == data  # stable bytes: replay and dedupe by content stay possible


def test_every_catalog_payload_has_a_round_trip_sample() -> None:
    sampled = {type(m) for m in SAMPLES}
    for subject in CATALOG:
        assert subject.request in sampled, subject.name
        assert subject.reply is None or subject.reply in sampled, subject.name


def test_placement_survives_with_its_derived_views() -> None:
    reply = decode(encode(PlanReply(version=1, placement=PLACEMENT)), PlanReply)
    assert reply.fits and reply.placement is not None
    assert reply.placement.by_node() == {"n1": 8, "n2": 1}
    assert reply.placement.slices[1].role is Role.SPARE


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `extra`"):
        decode(b'{"namespace": "a", "name": "b", "extra": 1}', RunChanged)


@pytest.mark.parametrize(
    ("message", "path"),
    [
        # An engine value inside an envelope struct (a dataclass: msgspec alone would ignore it).
        (lambda: PlanRequest(run=RUN, request=REQUEST, funding=FUNDING), ("request",)),
        # Deeper: an offer's envelope's lending terms, inside the funding.
        (
            lambda: PlanRequest(run=RUN, request=REQUEST, funding=FUNDING),
            ("funding", "offers", 0, "envelope", "lending"),
        ),
        # A lease and a pod of a commit.
        (lambda: CommitRequest(key="k", run=RUN, version=1, leases=[LEASE]), ("leases", 0)),
        (lambda: CommitRequest(key="k", run=RUN, version=1, pods=[POD]), ("pods", 0)),
        # A slice of a placement in a reply.
        (
            lambda: PlanReply(version=1, placement=PLACEMENT),
            ("placement", "groups", 0, "slices", 1),
        ),
    ],
)
def test_unknown_fields_inside_nested_values_are_rejected_too(
    message: Any, path: tuple[str | int, ...]
) -> None:
    msg = message()
    doc = json.loads(encode(msg))
    target = doc
    for step in path:
        target = target[step]
    target["smuggled"] = True
    where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"`smuggled` - at `{where}`")):
        decode(json.dumps(doc).encode(), type(msg))
    assert decode(encode(msg), type(msg)) == msg


def test_wrong_field_type_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.generation"):
        decode(b'{"namespace":"a","name":"b","uid":"u","generation":"3"}', RunRef)


def test_ledger_kind_is_closed_set() -> None:
    bad = encode(LedgerEvent("opened", "l", ("a", "b"), "e/f", 1, T0)).replace(
        b'"opened"', b'"reopened"'
    )
    with pytest.raises(msgspec.ValidationError):
        decode(bad, LedgerEvent)


def test_malformed_json_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode(b"{not json", RunChanged)


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        RUN.name = "other"  # type: ignore[misc]


def test_subject_names_and_durability() -> None:
    assert PLAN.name == "jobtree.v1.packer.plan"
    assert COMMIT.name == "jobtree.v1.binder.commit"
    assert NODE_FAILED.durable and LEDGER.durable and not PLAN.durable
    assert set(EVENTS_STREAM.subjects) == {NODE_FAILED.name, LEDGER.name}
    assert stream_of(LEDGER) is EVENTS_STREAM
    assert len({s.name for s in CATALOG}) == len(CATALOG)
    for s in CATALOG:
        assert s.name.startswith("jobtree.v1.")
        assert (s.reply is None) == s.is_event


def test_deadletter_convention() -> None:
    assert deadletter_subject(PLAN.name) == "jobtree.v1.deadletter.jobtree.v1.packer.plan"
    concrete = deadletter_of(PLAN)
    assert concrete.name == deadletter_subject(PLAN.name)
    assert concrete.request is DeadLetter and not concrete.is_wildcard
    assert DEADLETTER.is_wildcard
    assert stream_of(concrete).name == "JOBTREE_DEADLETTER"


def test_consumer_names_are_distinct_per_subject() -> None:
    a, b = consumer_name("forecast", LEDGER), consumer_name("forecast", NODE_FAILED)
    assert a != b
    for name in (a, b, consumer_name("x.y z", DEADLETTER)):
        assert re.fullmatch(r"[A-Za-z0-9_-]+", name), name


def test_docs_table_lists_the_catalog() -> None:
    text = DOCS.read_text()
    rows = {
        cells[0].strip("` "): cells
        for line in text.splitlines()
        if line.startswith("| `jobtree.")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {s.name for s in CATALOG}
    for s in CATALOG:
        cells = rows[s.name]
        assert cells[1].strip("`") == s.request.__name__, s.name
        assert cells[2].strip("`") == (s.reply.__name__ if s.reply else "—"), s.name
        assert cells[3] == ("yes" if s.durable else "no"), s.name
        assert cells[4] == f"{', '.join(s.producers)} → {', '.join(s.consumers)}", s.name


def test_subject_is_generic_and_hashable() -> None:
    custom: Subject[RunChanged, None] = Subject("jobtree.v1.test.x", RunChanged, None)
    assert hash(custom) == hash(Subject("jobtree.v1.test.x", RunChanged, None))
    assert custom.endpoint_name == "test-x"


def test_run_ref_of_a_run_object_tolerates_missing_fields() -> None:
    obj = {"metadata": {"namespace": "ns", "name": "r", "uid": "u-1", "generation": 3}}
    assert RunRef.of(obj) == RunRef(namespace="ns", name="r", uid="u-1", generation=3)
    assert RunRef.of({}) == RunRef(namespace="", name="", uid="", generation=0)
