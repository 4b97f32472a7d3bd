"""Command line + environment settings every service process shares.

Flags win over environment variables, which win over defaults, so a Helm chart can set everything
through ``env:`` while a developer overrides one value on the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Literal

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class ServiceConfig:
    """Resolved settings of one service process."""

    name: str
    nats_url: str
    kubeconfig: str | None
    http_host: str
    http_port: int
    """``0`` picks an ephemeral port (local runs); in-cluster the chart sets a fixed one."""
    log_level: str
    log_format: Literal["json", "text"]
    otlp_endpoint: str | None = None
    """OTLP/HTTP base URL traces are exported to (e.g. ``http://jaeger:4318``); None = off."""


def env_value(name: str, default: str) -> str:
    """The environment variable ``name``, or ``default`` when it is unset or empty: the fallback
    of a service's own flags (``default=float(env_value("JOBTREE_X", "30"))``)."""
    return os.environ.get(name) or default


def truthy(text: str) -> bool:
    """A boolean environment value: ``1``, ``true``, ``yes`` or ``on`` (any case)."""
    return text.strip().lower() in ("1", "true", "yes", "on")


def parse_service_args(
    name: str, parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, ServiceConfig]:
    """A service's own flags (``parser``, built with ``add_help=False``) from ``argv`` (default
    ``sys.argv[1:]``), then the common flags of :func:`service_args` from what remains.

    With ``-h``/``--help`` the own flags' help is printed first; the common parser then prints
    its help and exits.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(parser.format_help())
    ns, rest = parser.parse_known_args(args)
    return ns, service_args(name, rest)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def service_args(name: str, argv: list[str] | None = None) -> ServiceConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``) with environment fallbacks for service ``name``."""
    env = os.environ
    parser = argparse.ArgumentParser(prog=f"jobtree-{name}", description=f"Jobtree {name} service.")
    parser.add_argument(
        "--nats-url",
        default=env.get("JOBTREE_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server URL(s), comma separated ($JOBTREE_NATS_URL; default %(default)s)",
    )
    parser.add_argument(
        "--kubeconfig",
        default=env.get("KUBECONFIG") or None,
        help="kubeconfig path ($KUBECONFIG; default: in-cluster config)",
    )
    parser.add_argument(
        "--http-host",
        default=env.get("JOBTREE_HTTP_HOST", "127.0.0.1"),
        help="address of /healthz, /readyz, /metrics ($JOBTREE_HTTP_HOST; default %(default)s)",
    )
    parser.add_argument(
        "--http-port",
        type=_port,
        default=env.get("JOBTREE_HTTP_PORT", "0"),
        help="port of /healthz, /readyz, /metrics; 0 = ephemeral ($JOBTREE_HTTP_PORT)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        default=env.get("JOBTREE_LOG_LEVEL", "INFO"),
        help="($JOBTREE_LOG_LEVEL; default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=env.get("JOBTREE_LOG_FORMAT", "json"),
        help="one JSON object per line, or human text ($JOBTREE_LOG_FORMAT; default %(default)s)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        help="OTLP/HTTP endpoint traces are sent to, e.g. http://jaeger:4318 "
        "($OTEL_EXPORTER_OTLP_ENDPOINT; default: tracing off)",
    )
    ns = parser.parse_args(argv)
    fmt: Literal["json", "text"] = "text" if ns.log_format == "text" else "json"
    return ServiceConfig(
        name=name,
        nats_url=ns.nats_url,
        kubeconfig=ns.kubeconfig,
        http_host=ns.http_host,
        http_port=ns.http_port,
        log_level=ns.log_level,
        log_format=fmt,
        otlp_endpoint=ns.otlp_endpoint or None,
    )
