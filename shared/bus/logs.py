"""Structured logging: one JSON object per line (or plain text for a terminal).

Every line carries ``time``, ``level``, ``service``, ``logger`` and ``msg``, plus whatever the call
passed in ``extra=`` — which is how decisions stay grep-able and machine-readable, e.g. the
resolver's ``RandomPreempt`` line with its seed and conflict set. A line logged inside a span also
carries ``trace_id`` and ``span_id`` (W3C hex), so a log search leads straight to the trace.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "service"}
)


_HANDLER_NAME = "jobtree"


def _timestamp(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class TraceContext(logging.Filter):
    """Stamps ``trace_id``/``span_id`` of the span current at the log call on the record.

    Handlers format synchronously in the caller's context, so the current span is the one the
    line was logged in; an explicit ``extra={"trace_id": …}`` is left as it is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = trace.format_trace_id(ctx.trace_id)
            record.span_id = trace.format_span_id(ctx.span_id)
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call added with ``extra=``, in insertion order."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; non-JSON extras are rendered with ``str``."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "service": getattr(record, "service", self.service),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(extra_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level service logger: msg key=value …`` for humans at a terminal."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in extra_fields(record).items())
        line = (
            f"{_timestamp(record.created)} {record.levelname:<7} "
            f"{getattr(record, 'service', self.service)} {record.name}: {record.getMessage()}"
        )
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logging(
    level: str | int = "INFO",
    fmt: str = "json",
    *,
    service: str = "",
    stream: IO[str] | None = None,
) -> None:
    """Route the root logger to ``stream`` (stderr) in the chosen format.

    A second call replaces the handler the first one installed (never doubling lines) and leaves
    foreign handlers alone (e.g. pytest's capture).
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(TraceContext())
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
