"""Forecaster settings: the common service flags plus its own (flags win over environment).

``engine_flags``/``engine_settings`` are shared with the resolver, which must read the same
engine knobs (default duration, spare factor, conservative lead, horizon) to agree with the
forecasts it activates.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import timedelta

from shared.bus.config import ServiceConfig, env_value, parse_service_args
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


def engine_flags(parser: argparse.ArgumentParser) -> None:
    """The engine's operator knobs (``shared.engine.state.Settings``) and the GPU resource."""
    add = parser.add_argument
    add(
        "--gpu-resource",
        default=env_value("JOBTREE_GPU_RESOURCE", DEFAULT_GPU_RESOURCE),
        help="GPU extended resource of the nodes ($JOBTREE_GPU_RESOURCE; default %(default)s)",
    )
    add(
        "--default-duration-hours",
        type=float,
        default=float(env_value("JOBTREE_DEFAULT_DURATION_HOURS", "24")),
        help="expected duration of Runs without maxDuration ($JOBTREE_DEFAULT_DURATION_HOURS)",
    )
    add(
        "--spare-factor",
        type=float,
        default=float(env_value("JOBTREE_SPARE_FACTOR", "1.0")),
        help="fraction of a spare GPU-hour charged ($JOBTREE_SPARE_FACTOR)",
    )
    add(
        "--conservative-lead-hours",
        type=float,
        default=float(env_value("JOBTREE_CONSERVATIVE_LEAD_HOURS", "24")),
        help="ETA offered when nothing known bounds it ($JOBTREE_CONSERVATIVE_LEAD_HOURS)",
    )
    add(
        "--namespace",
        default=env_value("JOBTREE_NAMESPACE", "") or None,
        help="watch Runs and Reservations of one namespace only ($JOBTREE_NAMESPACE; default: all)",
    )
    add(
        "--horizon-days",
        type=float,
        default=float(env_value("JOBTREE_HORIZON_DAYS", "30")),
        help="how far forecasts replay the timeline ($JOBTREE_HORIZON_DAYS)",
    )


def engine_settings(ns: argparse.Namespace) -> Settings:
    return Settings(
        default_duration=timedelta(hours=ns.default_duration_hours),
        spare_factor=ns.spare_factor,
        conservative_lead=timedelta(hours=ns.conservative_lead_hours),
        horizon=timedelta(days=ns.horizon_days),
    )


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
