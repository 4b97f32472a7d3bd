"""Admission settings: the common service flags plus admission's own (flags win over env)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from shared.bus.config import ServiceConfig, parse_service_args
from shared.bus.settings import engine_flags, engine_settings, owner_globs_flag
from shared.control import pod_policy
from shared.control.pod_policy import PodPolicyConfig
from shared.control.tenancy import DEFAULT_OWNER_GLOBS, parse_globs
from shared.engine.state import Settings

FIELD_MANAGER = "jobtree-admission"


@dataclass(frozen=True)
class AdmissionConfig:
    """Resolved settings of one admission process."""

    service: ServiceConfig
    default_owner_globs: tuple[str, ...] = DEFAULT_OWNER_GLOBS
    """Owner globs of namespaces without the ``rq.davidlangworthy.io/owners`` annotation (none:
    tenancy is closed unless the operator opens it)."""
    pod_policy: PodPolicyConfig = field(default_factory=PodPolicyConfig)
    """What a Run's ``spec.template`` may ask for (``shared.control.pod_policy``)."""
    settings: Settings = field(default_factory=Settings)
    resync_seconds: float = 30.0
    """Every Run is reconciled (GPU-hours refreshed) and every Budget rewritten this often."""
    budget_interval: float = 2.0
    """Budget status after ledger events is written at most this often."""
    plan_timeout: float = 5.0
    commit_timeout: float = 20.0
    reserve_timeout: float = 10.0
    conflict_retries: int = 3
    """Binder conflicts retried with fresh state before backing off."""
    backoff_seconds: float = 10.0
    """Wait before the next start attempt after a conflict or an unavailable service."""
    grace_seconds: float = 30.0
    """How long a just-bound/just-reserved Run waits for the cache to show its objects."""
    workers: int = 4
    webhook_port: int | None = None
    """HTTPS port of /validate and /mutate; None disables the webhook server, 0 = ephemeral."""
    webhook_host: str = "0.0.0.0"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    """Names/IPs the generated self-signed certificate is valid for."""


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobtree-admission", add_help=False)
    add = parser.add_argument
    owner_globs_flag(parser)
    pod_policy.add_arguments(parser)
    add("--resync-seconds", type=float, default=float(_env("JOBTREE_RESYNC_SECONDS", "30")))
    add("--budget-interval", type=float, default=float(_env("JOBTREE_BUDGET_INTERVAL", "2")))
    add("--plan-timeout", type=float, default=float(_env("JOBTREE_PLAN_TIMEOUT", "5")))
    add("--commit-timeout", type=float, default=float(_env("JOBTREE_COMMIT_TIMEOUT", "20")))
    add("--reserve-timeout", type=float, default=float(_env("JOBTREE_RESERVE_TIMEOUT", "10")))
    add("--workers", type=int, default=int(_env("JOBTREE_ADMISSION_WORKERS", "4")))
    port = _env("JOBTREE_WEBHOOK_PORT", "")
    add(
        "--webhook-port",
        type=int,
        default=int(port) if port else None,
        help="serve /validate and /mutate over HTTPS on this port (0 = ephemeral; unset = off)",
    )
    add("--webhook-host", default=_env("JOBTREE_WEBHOOK_HOST", "0.0.0.0"))
    add("--tls-cert", default=_env("JOBTREE_TLS_CERT", "") or None)
    add("--tls-key", default=_env("JOBTREE_TLS_KEY", "") or None)
    add(
        "--tls-hosts",
        default=_env("JOBTREE_TLS_HOSTS", "localhost,127.0.0.1"),
        help="DNS names / IPs of the generated self-signed certificate (comma separated)",
    )
    engine_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> AdmissionConfig:
    """Admission flags, then the common service flags from what remains."""
    parser = _parser()
    ns, service = parse_service_args("admission", parser, argv)
    try:
        policy = pod_policy.from_arguments(ns)
    except ValueError as exc:
        parser.error(str(exc))
    return AdmissionConfig(
        service=service,
        default_owner_globs=parse_globs(ns.default_owner_globs),
        pod_policy=policy,
        settings=engine_settings(ns),
        resync_seconds=ns.resync_seconds,
        budget_interval=ns.budget_interval,
        plan_timeout=ns.plan_timeout,
        commit_timeout=ns.commit_timeout,
        reserve_timeout=ns.reserve_timeout,
        workers=max(1, ns.workers),
        webhook_port=ns.webhook_port,
        webhook_host=ns.webhook_host,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_hosts=parse_globs(ns.tls_hosts),
    )
