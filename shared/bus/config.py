"""Command line + environment settings every service process shares.

Flags win over environment variables, which win over defaults, so a Helm chart can set everything
through ``env:`` while a developer overrides one value on the command line.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class BusCredentials:
    """How a service proves its identity to NATS, and how it checks the server's.

    At most one of: a user and password (the password from a file or the environment, never a
    flag), an nkey seed file, or a ``.creds`` file (user JWT + seed). TLS: a CA bundle to verify
    the server, optionally with this client's certificate and key (mutual TLS).
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    """The name the server certificate must carry when the URL's host is another (an IP, a
    port-forward); by default the URL's host."""

    def __post_init__(self) -> None:
        kinds = [
            k
            for k, given in (
                ("password", self.password is not None or self.password_file is not None),
                ("nkey seed", self.nkey_seed_file is not None),
                ("creds", self.creds_file is not None),
            )
            if given
        ]
        if len(kinds) > 1:
            raise ValueError(f"NATS credentials: give only one of {' / '.join(kinds)}")
        if (self.password is not None or self.password_file is not None) and not self.user:
            raise ValueError("NATS credentials: a password needs a user (--nats-user)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("NATS TLS: give both --nats-tls-cert-file and --nats-tls-key-file")

    def _password(self) -> str | None:
        if self.password_file is not None:
            return Path(self.password_file).read_text().strip()
        return self.password

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context (server verified against the CA; client cert for mTLS)."""
        if self.tls_ca_file is None and self.tls_cert_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of ``nats.connect`` (files are read now, so a rotated password or
        certificate is picked up at the next connect)."""
        opts: dict[str, Any] = {}
        password = self._password()
        if self.user is not None and password is not None:
            opts["user"], opts["password"] = self.user, password
        elif self.user is not None:
            opts["user"] = self.user
        if self.nkey_seed_file is not None:
            opts["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file is not None:
            opts["user_credentials"] = self.creds_file
        tls = self.tls_context()
        if tls is not None:
            opts["tls"] = tls
            if self.tls_server_name is not None:
                opts["tls_hostname"] = self.tls_server_name
        return opts


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
    credentials: BusCredentials = field(default_factory=BusCredentials)


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
    _credential_args(parser, env)
    ns = parser.parse_args(argv)
    fmt: Literal["json", "text"] = "text" if ns.log_format == "text" else "json"
    password_file: str | None = ns.nats_password_file or None
    try:
        credentials = BusCredentials(
            user=ns.nats_user or None,
            password=None if password_file else env.get("JOBTREE_NATS_PASSWORD") or None,
            password_file=password_file,
            nkey_seed_file=ns.nats_nkey_seed_file or None,
            creds_file=ns.nats_creds_file or None,
            tls_ca_file=ns.nats_tls_ca_file or None,
            tls_cert_file=ns.nats_tls_cert_file or None,
            tls_key_file=ns.nats_tls_key_file or None,
            tls_server_name=ns.nats_tls_server_name or None,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return ServiceConfig(
        name=name,
        nats_url=ns.nats_url,
        kubeconfig=ns.kubeconfig,
        http_host=ns.http_host,
        http_port=ns.http_port,
        log_level=ns.log_level,
        log_format=fmt,
        otlp_endpoint=ns.otlp_endpoint or None,
        credentials=credentials,
    )


def _credential_args(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The NATS credential and TLS flags (see :class:`BusCredentials`)."""
    group = parser.add_argument_group(
        "NATS credentials",
        "The service's own bus identity. A password is read from --nats-password-file or from "
        "$JOBTREE_NATS_PASSWORD, never from a flag.",
    )
    for flag, var, text in (
        ("--nats-user", "JOBTREE_NATS_USER", "NATS user name (with a password)"),
        ("--nats-password-file", "JOBTREE_NATS_PASSWORD_FILE", "file holding the password"),
        ("--nats-nkey-seed-file", "JOBTREE_NATS_NKEY_SEED_FILE", "nkey seed file (SU…)"),
        ("--nats-creds-file", "JOBTREE_NATS_CREDS_FILE", ".creds file (user JWT + nkey seed)"),
        ("--nats-tls-ca-file", "JOBTREE_NATS_TLS_CA_FILE", "CA bundle the server is checked with"),
        ("--nats-tls-cert-file", "JOBTREE_NATS_TLS_CERT_FILE", "client certificate (mutual TLS)"),
        ("--nats-tls-key-file", "JOBTREE_NATS_TLS_KEY_FILE", "client private key (mutual TLS)"),
        (
            "--nats-tls-server-name",
            "JOBTREE_NATS_TLS_SERVER_NAME",
            "name the server certificate must carry (default: the URL's host)",
        ),
    ):
        group.add_argument(flag, default=env.get(var) or None, help=f"{text} (${var})")
