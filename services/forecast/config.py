"""Forecaster settings: the common service flags, the engine settings every service shares
(``shared.bus.settings``) and its own (flags win over environment)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from shared.bus.config import ServiceConfig, env_value, parse_service_args
from shared.bus.settings import engine_flags, engine_settings, gpu_resource_flag, namespace_flag
from shared.engine.state import Settings
from shared.engine.topology import DEFAULT_GPU_RESOURCE


@dataclass(frozen=True)
class ForecastOptions:
    """Operator knobs of the forecaster."""

    tick_seconds: float = 5.0
    """Timer period: countdown refresh, activation, cancellation, AtRisk reconciliation."""
    retry_seconds: float = 60.0
    """An Active Reservation without an outcome for this long gets ACTIVATE again."""
    activate_timeout: float = 200.0
    """Longer than the resolver's commit timeout times its re-sends."""
    refresh_seconds: float = 30.0
    """After ledger events, forecasts of Pending Reservations are recomputed at most this often."""
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    namespace: str | None = None
    """Only Runs and Reservations of this namespace (None: every namespace)."""
    settings: Settings = field(default_factory=Settings)


def parse_args(argv: list[str] | None = None) -> tuple[ServiceConfig, ForecastOptions]:
    """Forecaster flags, then the common service flags from what remains."""
    parser = argparse.ArgumentParser(prog="jobtree-forecast", add_help=False)
    add = parser.add_argument
    add(
        "--tick-seconds",
        type=float,
        default=float(env_value("JOBTREE_FORECAST_TICK_SECONDS", "5")),
        help="timer period: countdowns, activation, cancellation ($JOBTREE_FORECAST_TICK_SECONDS)",
    )
    add(
        "--retry-seconds",
        type=float,
        default=float(env_value("JOBTREE_ACTIVATION_RETRY_SECONDS", "60")),
        help="resend ACTIVATE after this long without an outcome "
        "($JOBTREE_ACTIVATION_RETRY_SECONDS)",
    )
    add(
        "--activate-timeout",
        type=float,
        default=float(env_value("JOBTREE_ACTIVATE_TIMEOUT", "200")),
        help="seconds to wait for the resolver's answer ($JOBTREE_ACTIVATE_TIMEOUT)",
    )
    add(
        "--refresh-seconds",
        type=float,
        default=float(env_value("JOBTREE_FORECAST_REFRESH_SECONDS", "30")),
        help="recompute pending forecasts after ledger events at most this often",
    )
    gpu_resource_flag(parser)
    namespace_flag(parser)
    engine_flags(parser)
    ns, cfg = parse_service_args("forecast", parser, argv)
    return cfg, ForecastOptions(
        tick_seconds=ns.tick_seconds,
        retry_seconds=ns.retry_seconds,
        activate_timeout=ns.activate_timeout,
        refresh_seconds=ns.refresh_seconds,
        gpu_resource=ns.gpu_resource,
        namespace=ns.namespace,
        settings=engine_settings(ns),
    )
