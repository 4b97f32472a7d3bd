"""Bus-level Prometheus metrics, registered once per process in the default registry.

Every series carries a ``service`` label even though a process normally hosts one service: the
combined ``jobtree-controller-manager`` pod runs all five runtimes in one process, and the tests run
several side by side, so the label is what keeps their numbers apart.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

DEADLETTER = Counter(
    "jobtree_deadletter_total",
    "Payloads rejected to the dead-letter subject (undecodable, or failing past the retry limit).",
    ["service", "subject"],
)

HANDLER_ERRORS = Counter(
    "jobtree_handler_errors_total",
    "Handler exceptions while serving a request or consuming an event.",
    ["service", "subject"],
)

HANDLER_SECONDS = Histogram(
    "jobtree_handler_seconds",
    "Time to handle one request or event, decode to reply.",
    ["service", "subject"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

NATS_RECONNECTS = Counter(
    "jobtree_nats_reconnects_total",
    "Times the service's NATS connection was re-established after a loss.",
    ["service"],
)

NATS_CONNECTED = Gauge(
    "jobtree_nats_connected",
    "1 while the service's NATS connection is up, 0 while it is lost or closed.",
    ["service"],
)

SERVICE_INFO = Info(
    "jobtree_service",
    "Which Jobtree service (and version) this process runs; one series per hosted service.",
    ["service"],
)

_services: list[str] = []


def expose_service(name: str, version: str) -> None:
    """Publish ``jobtree_service_info{service=name,version=…} 1`` and remember the name, so code
    far from the runtime can label its own metrics with :func:`current_service`."""
    SERVICE_INFO.labels(service=name).info({"version": version})
    if name not in _services:
        _services.append(name)


def current_service() -> str:
    """The first service this process exposed (``""`` before any runtime started)."""
    return _services[0] if _services else ""
