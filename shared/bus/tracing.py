"""OpenTelemetry tracing across the bus: one trace per Run decision, through every service hop.

A service process calls :func:`configure_tracing` once with its name (``jobtree-<service>``) and
an OTLP/HTTP endpoint (``--otlp-endpoint`` / ``$OTEL_EXPORTER_OTLP_ENDPOINT``, e.g. Jaeger's
``http://jaeger:4318``). Without an endpoint nothing is installed: the OpenTelemetry API's no-op
tracer stays in place and every span below costs next to nothing.

``ServiceRuntime`` uses the helpers here on both sides of every NATS hop:

* sending (``request`` / ``publish``): a CLIENT / PRODUCER span named after the subject, whose
  context is injected into the NATS message headers (W3C ``traceparent``, plus ``baggage``, the
  API's default propagators; ``$OTEL_PROPAGATORS`` changes them);
* receiving (endpoints / subscriptions, core and JetStream): the context is extracted from the
  headers and the handler runs inside a SERVER / CONSUMER span named after the subject.

Attributes on every bus span: ``messaging.system=nats``, ``messaging.destination`` (and the newer
``messaging.destination.name``) = the subject, ``messaging.operation`` and ``jobtree.service``.
Durable events keep their context in the JetStream store, so a LEDGER event consumed after a
restart still joins the trace of the decision that published it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

log = logging.getLogger(__name__)

TRACER_NAME = "jobtree.bus"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_PATH = "/v1/traces"

SYSTEM = "messaging.system"
DESTINATION = "messaging.destination"
DESTINATION_NAME = "messaging.destination.name"
OPERATION = "messaging.operation"
SERVICE = "jobtree.service"

RUN_NAMESPACE = "jobtree.run.namespace"
RUN_NAME = "jobtree.run.name"
RUN_UID = "jobtree.run.uid"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a base endpoint (``http://host:4318`` → ``…/v1/traces``).

    As in the OpenTelemetry exporter spec, the generic endpoint is a base URL the signal path is
    appended to; one that already names ``/v1/traces`` is used as it is.
    """
    url = endpoint.strip().rstrip("/")
    return url if url.endswith(TRACES_PATH) else url + TRACES_PATH


def configure_tracing(
    service_name: str,
    endpoint: str | None,
    *,
    version: str = "0.1.0",
    exporter: SpanExporter | None = None,
) -> TracerProvider | None:
    """Install the process's tracer provider: spans of ``service_name`` go to ``endpoint``.

    ``endpoint`` empty or None (and no ``exporter``) leaves tracing off — the no-op tracer — and
    returns None. ``exporter`` replaces the OTLP/HTTP exporter (tests pass the SDK's in-memory
    one). Spans are batched (``$OTEL_BSP_*`` tune the batching) and flushed at process exit.
    Call it once per process, before or after the runtimes are built: their tracers resolve
    through the global provider.
    """
    if exporter is None:
        if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            log.debug("tracing off: no OTLP endpoint")
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
    resource = Resource.create({SERVICE_NAME: service_name, SERVICE_VERSION: version})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info(
        "tracing on",
        extra={"service_name": service_name, "otlp_endpoint": endpoint or type(exporter).__name__},
    )
    return provider


def tracer(provider: trace.TracerProvider | None = None) -> Tracer:
    """The bus tracer (the global provider's unless one is given; no-op until configured)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def _attributes(subject: str, operation: str, service: str) -> dict[str, str]:
    return {
        SYSTEM: "nats",
        DESTINATION: subject,
        DESTINATION_NAME: subject,
        OPERATION: operation,
        SERVICE: service,
    }


@contextlib.contextmanager
def sending(
    bus_tracer: Tracer,
    subject: str,
    *,
    service: str,
    headers: Mapping[str, str] | None,
    request: bool,
) -> Iterator[dict[str, str]]:
    """A CLIENT (``request``) or PRODUCER span around one send; yields the headers to send:
    the caller's plus the span's context."""
    kind = SpanKind.CLIENT if request else SpanKind.PRODUCER
    operation = "request" if request else "publish"
    with bus_tracer.start_as_current_span(
        subject, kind=kind, attributes=_attributes(subject, operation, service)
    ):
        carrier = dict(headers or {})
        propagate.inject(carrier)
        yield carrier


@contextlib.contextmanager
def receiving(
    bus_tracer: Tracer,
    subject: str,
    *,
    service: str,
    headers: Mapping[str, str] | None,
    request: bool,
    destination: str | None = None,
) -> Iterator[Span]:
    """A SERVER (``request``) or CONSUMER span, child of the context in ``headers``, around one
    handler; ``destination`` is the concrete subject when ``subject`` is a wildcard."""
    parent = propagate.extract(dict(headers or {}), context=Context())
    kind = SpanKind.SERVER if request else SpanKind.CONSUMER
    attributes = _attributes(destination or subject, "process", service)
    with bus_tracer.start_as_current_span(
        subject, context=parent, kind=kind, attributes=attributes
    ) as span:
        yield span


def mark_failed(span: Span, description: str) -> None:
    """Mark a span failed without an exception (an error reply, a dead-lettered message)."""
    span.set_status(Status(StatusCode.ERROR, description))


@contextlib.contextmanager
def run_decision(
    namespace: str, name: str, uid: str, *, provider: trace.TracerProvider | None = None
) -> Iterator[Span]:
    """The root span ``run.decide`` of one Run decision; every bus hop it causes joins it."""
    with tracer(provider).start_as_current_span(
        "run.decide",
        context=Context(),  # a new trace, whatever triggered the reconcile
        kind=SpanKind.INTERNAL,
        attributes={RUN_NAMESPACE: namespace, RUN_NAME: name, RUN_UID: uid},
    ) as span:
        yield span
