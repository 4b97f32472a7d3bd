"""Trace context across the bus, on a real nats-server: a request, a durable (JetStream) event and
a core event each carry the sender's W3C ``traceparent`` in the NATS headers, and the receiving
runtime's SERVER/CONSUMER span continues the sender's trace.

Each runtime gets its own SDK ``TracerProvider`` (its own ``service.name``) writing to the SDK's
in-memory exporter, so two "services" in one test process stay apart and the global provider is
never touched. The export to a real Jaeger is covered by ``tests/e2e/test_tracing.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shared.bus import tracing
from shared.bus.config import service_args
from shared.bus.messages import CommitReply, LedgerEvent, RunChanged, RunRef
from shared.bus.runtime import BusError, ServiceRuntime
from shared.bus.subjects import LEDGER, Subject
from shared.localenv.natsserver import NatsServer
from tests.conftest import TESTER

pytestmark = [pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

RUN = RunRef(namespace="ns", name="r", uid="u", generation=1)


def uid() -> str:
    return uuid.uuid4().hex[:10]


def provider(service: str, exporter: InMemorySpanExporter) -> TracerProvider:
    made = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    made.add_span_processor(SimpleSpanProcessor(exporter))
    return made


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def only(spans: list[ReadableSpan], **match: Any) -> ReadableSpan:
    """The one finished span whose name/kind/service match."""
    found = [
        s
        for s in spans
        if all(
            (s.resource.attributes.get(SERVICE_NAME) if key == "service" else getattr(s, key))
            == want
            for key, want in match.items()
        )
    ]
    assert len(found) == 1, f"expected one span {match}, got {[(s.name, s.kind) for s in spans]}"
    return found[0]


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


Factory = Callable[..., Awaitable[ServiceRuntime]]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def runtime(nats_server: NatsServer) -> AsyncIterator[Factory]:
    """Runtimes on the session's nats-server, each with its own tracer provider."""
    made: list[ServiceRuntime] = []

    async def make(
        name: str,
        tracer_provider: TracerProvider | None,
        setup: Callable[[ServiceRuntime], None] | None = None,
    ) -> ServiceRuntime:
        rt = ServiceRuntime(
            name,
            nats_url=nats_server.url,
            tracer_provider=tracer_provider,
            credentials=nats_server.credentials(TESTER),
        )
        made.append(rt)
        if setup is not None:
            setup(rt)
        await rt.start()
        rt.set_ready(True)
        return rt

    yield make
    for rt in made:
        await rt.stop()


@pytest.fixture
async def tap(nats_server: NatsServer) -> AsyncIterator[Callable[[str], Awaitable[list[Any]]]]:
    """A plain NATS client that records the messages (with headers) sent on a subject."""
    nc = await nats.connect(nats_server.url, **nats_server.connect_options(TESTER))

    async def watch(subject: str) -> list[Any]:
        seen: list[Any] = []

        async def on_msg(msg: Any) -> None:
            seen.append(msg)

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        return seen

    yield watch
    await nc.close()


async def test_request_carries_traceparent_and_continues_the_trace(
    runtime: Factory, exporter: InMemorySpanExporter, tap: Callable[[str], Awaitable[list[Any]]]
) -> None:
    subject: Subject[RunRef, CommitReply] = Subject(
        f"jobtree.v1.test{uid()}.echo", RunRef, CommitReply
    )
    inside: list[trace.SpanContext] = []

    async def handler(req: RunRef) -> CommitReply:
        inside.append(trace.get_current_span().get_span_context())
        return CommitReply(ok=True, conflict=req.name)

    server_provider = provider("jobtree-packer", exporter)
    client_provider = provider("jobtree-admission", exporter)
    await runtime("packer", server_provider, lambda rt: rt.endpoint(subject, handler))
    client = await runtime("admission", client_provider)
    wire = await tap(subject.name)

    with tracing.run_decision("ns", "r", "u-1", provider=client_provider):
        reply = await client.request(subject, RUN, headers={"X-Extra": "kept"})
    assert reply == CommitReply(ok=True, conflict="r")

    spans = list(exporter.get_finished_spans())
    root = only(spans, name="run.decide", service="jobtree-admission")
    sent = only(spans, name=subject.name, kind=SpanKind.CLIENT, service="jobtree-admission")
    served = only(spans, name=subject.name, kind=SpanKind.SERVER, service="jobtree-packer")

    assert root.parent is None
    assert dict(root.attributes or {}) == {
        tracing.RUN_NAMESPACE: "ns",
        tracing.RUN_NAME: "r",
        tracing.RUN_UID: "u-1",
    }
    # one trace: run.decide → CLIENT (admission) → SERVER (packer)
    assert hex_trace(root) == hex_trace(sent) == hex_trace(served)
    assert sent.parent is not None and root.context is not None
    assert sent.parent.span_id == root.context.span_id
    assert served.parent is not None and sent.context is not None
    assert served.parent.span_id == sent.context.span_id
    assert served.parent.is_remote
    # the handler ran inside the SERVER span
    assert served.context is not None
    assert inside == [served.context]
    for span, service in ((sent, "admission"), (served, "packer")):
        attrs = dict(span.attributes or {})
        assert attrs[tracing.SYSTEM] == "nats"
        assert attrs[tracing.DESTINATION] == subject.name
        assert attrs[tracing.DESTINATION_NAME] == subject.name
        assert attrs[tracing.SERVICE] == service
        assert span.status.status_code is StatusCode.UNSET

    # on the wire: the W3C header of the CLIENT span, beside the caller's own header
    await wait_for(lambda: len(wire) == 1)
    headers = wire[0].headers
    assert headers["X-Extra"] == "kept"
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00"
    assert int(flags, 16) & 0x01  # sampled
    assert trace_id == hex_trace(root)
    assert int(span_id, 16) == sent.context.span_id


async def test_error_reply_marks_both_sides(
    runtime: Factory, exporter: InMemorySpanExporter
) -> None:
    subject: Subject[RunRef, CommitReply] = Subject(
        f"jobtree.v1.test{uid()}.fail", RunRef, CommitReply
    )

    async def handler(req: RunRef) -> CommitReply:
        raise RuntimeError("boom")

    await runtime(
        "binder", provider("jobtree-binder", exporter), lambda r: r.endpoint(subject, handler)
    )
    client = await runtime("resolver", provider("jobtree-resolver", exporter))
    with pytest.raises(BusError) as err:
        await client.request(subject, RUN)
    assert err.value.code == "500"

    spans = list(exporter.get_finished_spans())
    sent = only(spans, kind=SpanKind.CLIENT, service="jobtree-resolver")
    served = only(spans, kind=SpanKind.SERVER, service="jobtree-binder")
    assert hex_trace(sent) == hex_trace(served)
    assert sent.parent is None  # no decision around it: the send starts its own trace
    assert served.status.status_code is StatusCode.ERROR
    assert "500" in (served.status.description or "")
    assert sent.status.status_code is StatusCode.ERROR
    assert any(event.name == "exception" for event in sent.events)


@pytest.mark.parametrize("durable", [True, False], ids=["jetstream", "core"])
async def test_event_consumer_continues_the_publishers_trace(
    runtime: Factory, exporter: InMemorySpanExporter, durable: bool
) -> None:
    got: list[tuple[Any, trace.SpanContext]] = []
    marker = uid()

    async def on_event(event: Any) -> None:
        got.append((event, trace.get_current_span().get_span_context()))

    if durable:
        subject: Subject[Any, None] = LEDGER
        event: Any = LedgerEvent(
            kind="opened",
            lease=f"lease-{marker}",
            run=("ns", "r"),
            envelope="b/e",
            gpus=8,
            at=datetime(2025, 3, 1, 12, tzinfo=UTC),
        )
    else:
        subject = Subject(f"jobtree.v1.test{marker}.changed", RunChanged, None)
        event = RunChanged(namespace="ns", name=marker)

    def setup(rt: ServiceRuntime) -> None:
        if durable:
            rt.subscribe(subject, on_event, durable=f"trace{marker}")
        else:
            rt.subscribe(subject, on_event)

    consumer_provider = provider("jobtree-forecast", exporter)
    await runtime("forecast", consumer_provider, setup)
    producer_provider = provider("jobtree-binder", exporter)
    producer = await runtime("binder", producer_provider)

    with trace.get_tracer("test", tracer_provider=producer_provider).start_as_current_span(
        "commit"
    ):
        await producer.publish(subject, event, msg_id=f"{marker}:opened" if durable else None)

    # a new durable consumer also receives earlier tests' LEDGER events: wait for ours
    await wait_for(lambda: any(e == event for e, _ in got))
    ctx = next(c for e, c in got if e == event)

    spans = list(exporter.get_finished_spans())
    commit = only(spans, name="commit")
    sent = only(spans, name=subject.name, kind=SpanKind.PRODUCER, service="jobtree-binder")
    assert commit.context is not None and sent.context is not None
    consumed = [
        s
        for s in spans
        if s.kind is SpanKind.CONSUMER and s.context is not None and s.context == ctx
    ]
    assert len(consumed) == 1, [(s.name, s.kind) for s in spans]
    span = consumed[0]
    assert span.name == subject.name
    assert span.resource.attributes[SERVICE_NAME] == "jobtree-forecast"
    assert hex_trace(span) == hex_trace(sent) == hex_trace(commit)
    assert span.parent is not None and span.parent.span_id == sent.context.span_id
    attrs = dict(span.attributes or {})
    assert attrs[tracing.SYSTEM] == "nats"
    assert attrs[tracing.DESTINATION] == subject.name
    assert attrs[tracing.SERVICE] == "forecast"


async def test_untraced_runtime_sends_no_context(
    runtime: Factory, tap: Callable[[str], Awaitable[list[Any]]]
) -> None:
    """Tracing off (no provider configured): nothing is injected, handlers still run."""
    subject: Subject[RunRef, CommitReply] = Subject(
        f"jobtree.v1.test{uid()}.plain", RunRef, CommitReply
    )

    async def handler(req: RunRef) -> CommitReply:
        assert not trace.get_current_span().get_span_context().is_valid
        return CommitReply(ok=True)

    await runtime("packer", None, lambda rt: rt.endpoint(subject, handler))
    client = await runtime("admission", None)
    wire = await tap(subject.name)
    assert (await client.request(subject, RUN)).ok
    await wait_for(lambda: len(wire) == 1)
    assert "traceparent" not in (wire[0].headers or {})


async def test_configure_without_endpoint_is_off() -> None:
    assert tracing.configure_tracing("jobtree-packer", None) is None
    assert tracing.configure_tracing("jobtree-packer", "") is None


async def test_traces_url() -> None:
    assert tracing.traces_url("http://jaeger:4318") == "http://jaeger:4318/v1/traces"
    assert tracing.traces_url("http://jaeger:4318/") == "http://jaeger:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


async def test_otlp_endpoint_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert service_args("packer", []).otlp_endpoint is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4318")
    assert service_args("packer", []).otlp_endpoint == "http://jaeger:4318"
    cfg = service_args("packer", ["--otlp-endpoint", "http://other:4318"])
    assert cfg.otlp_endpoint == "http://other:4318"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    assert service_args("packer", []).otlp_endpoint is None
