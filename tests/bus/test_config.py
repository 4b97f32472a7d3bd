"""Process settings and structured logs shared by every service (no server needed)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from shared.bus.config import DEFAULT_NATS_URL, service_args
from shared.bus.logs import configure_logging

ENV = (
    "JOBTREE_NATS_URL",
    "KUBECONFIG",
    "JOBTREE_HTTP_HOST",
    "JOBTREE_HTTP_PORT",
    "JOBTREE_LOG_LEVEL",
    "JOBTREE_LOG_FORMAT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    cfg = service_args("packer", [])
    assert cfg.name == "packer"
    assert cfg.nats_url == DEFAULT_NATS_URL == "nats://127.0.0.1:4222"
    assert cfg.kubeconfig is None
    assert (cfg.http_host, cfg.http_port) == ("127.0.0.1", 0)
    assert (cfg.log_level, cfg.log_format) == ("INFO", "json")


def test_environment_then_flags(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("JOBTREE_NATS_URL", "nats://nats:4222")
    clean_env.setenv("KUBECONFIG", "/etc/kube/config")
    clean_env.setenv("JOBTREE_HTTP_PORT", "8080")
    clean_env.setenv("JOBTREE_LOG_LEVEL", "debug")
    clean_env.setenv("JOBTREE_LOG_FORMAT", "text")
    cfg = service_args("binder", [])
    assert cfg.nats_url == "nats://nats:4222"
    assert cfg.kubeconfig == "/etc/kube/config"
    assert cfg.http_port == 8080
    assert (cfg.log_level, cfg.log_format) == ("DEBUG", "text")

    cfg = service_args(
        "binder", ["--nats-url", "nats://other:4222", "--http-port", "9090", "--log-format", "json"]
    )
    assert (cfg.nats_url, cfg.http_port, cfg.log_format) == ("nats://other:4222", 9090, "json")


@pytest.mark.parametrize(
    "argv", [["--http-port", "x"], ["--http-port", "70000"], ["--log-format", "xml"]]
)
def test_bad_values_exit(clean_env: pytest.MonkeyPatch, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        service_args("forecast", argv)
    assert exc.value.code == 2


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_service_and_extras(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", service="resolver", stream=out)
    configure_logging("INFO", "json", service="resolver", stream=out)  # replaces, not doubles
    log = logging.getLogger("services.resolver")
    log.info("RandomPreempt seed=%s", "ab12", extra={"seed": "ab12", "conflict_set": [("ns", "r")]})
    log.debug("hidden")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "RandomPreempt seed=ab12"
    assert first["level"] == "info" and first["service"] == "resolver"
    assert first["logger"] == "services.resolver"
    assert first["seed"] == "ab12" and first["conflict_set"] == [["ns", "r"]]
    assert first["time"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_text_format(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("debug", "text", service="packer", stream=out)
    logging.getLogger("x").debug("hello", extra={"node": "n1"})
    line = out.getvalue().strip()
    assert line.endswith("DEBUG   packer x: hello node=n1")
    with pytest.raises(ValueError):
        configure_logging("INFO", "yaml")


def test_lines_inside_a_span_carry_its_trace_and_span_ids(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", service="binder", stream=out)
    log = logging.getLogger("services.binder")
    log.info("outside")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("commit") as span:
        log.info("inside")
        ctx = span.get_span_context()
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["trace_id"] == f"{ctx.trace_id:032x}"
    assert inside["span_id"] == f"{ctx.span_id:016x}"
