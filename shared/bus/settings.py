"""Flags several services share, declared once: the engine settings, the GPU resource, the
watched namespace.

Every service (admission, packer, forecast, resolver, binder) adds :func:`engine_flags` to its
parser and builds :class:`~shared.engine.state.Settings` with :func:`engine_settings`, so one
environment block (the Helm chart's ``engine`` values, the Kustomize base's ``jobtree-engine``
ConfigMap, the environment ``jobtree-local`` runs in) configures them all alike. That matters:
the binder re-checks a commit's GPU-hours with the same spare factor and default duration the
admission or resolver that proposed it used. Flags win over the environment, which wins over the
defaults (those of ``Settings``). A bad value is refused at start, naming the flag and the
variable.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from shared.bus.config import env_value
from shared.control.tenancy import DEFAULT_OWNER_GLOBS
from shared.engine.state import Settings
from shared.engine.topology import DEFAULT_GPU_RESOURCE

_DEFAULTS = Settings()


@dataclass(frozen=True, slots=True)
class _Knob:
    """One engine setting: its flag, its variable, its unit and what it means."""

    field: str
    flag: str
    env: str
    unit: timedelta | None
    """``Settings`` stores a timedelta of this many units; None: a plain float."""
    help: str
    fraction: bool = False
    """Between 0 and 1 (else: positive)."""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def default(self) -> str:
        value = getattr(_DEFAULTS, self.field)
        number = value / self.unit if self.unit is not None else value
        return f"{number:g}"

    def parse(self, text: str) -> float:
        where = f"(the flag or ${self.env})"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r} {where}") from None
        if self.fraction and not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text} {where}")
        if not self.fraction and not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text} {where}")
        return value


HOURS, DAYS, SECONDS = timedelta(hours=1), timedelta(days=1), timedelta(seconds=1)
KNOBS = (
    _Knob(
        "default_duration",
        "--default-duration-hours",
        "JOBTREE_DEFAULT_DURATION_HOURS",
        HOURS,
        "expected duration of a Run without maxDuration: GPU-hours headroom and its re-check",
    ),
    _Knob(
        "spare_factor",
        "--spare-factor",
        "JOBTREE_SPARE_FACTOR",
        None,
        "fraction of a spare GPU-hour charged to the paying envelope",
        fraction=True,
    ),
    _Knob(
        "conservative_lead",
        "--conservative-lead-hours",
        "JOBTREE_CONSERVATIVE_LEAD_HOURS",
        HOURS,
        "ETA offered when no known lease end or window makes a Run fit",
    ),
    _Knob(
        "horizon",
        "--horizon-days",
        "JOBTREE_HORIZON_DAYS",
        DAYS,
        "how far forecasts replay the timeline",
    ),
    _Knob(
        "node_grace",
        "--node-grace-seconds",
        "JOBTREE_NODE_GRACE_SECONDS",
        SECONDS,
        "how long a leased node may be NotReady before it counts as failed",
    ),
    _Knob(
        "missing_pod_grace",
        "--missing-pod-grace-seconds",
        "JOBTREE_MISSING_POD_GRACE_SECONDS",
        SECONDS,
        "how long a running rank may have no pod before its gang fails",
    ),
)
"""Every field of ``Settings``, in the order ``--help`` lists them."""


def engine_flags(parser: argparse.ArgumentParser) -> None:
    """Add the engine settings to a service's parser (each with its environment fallback)."""
    group = parser.add_argument_group("engine settings (the same for every service)")
    for knob in KNOBS:
        parse: Callable[[str], float] = knob.parse
        group.add_argument(
            knob.flag,
            dest=knob.dest,
            type=parse,
            default=env_value(knob.env, knob.default()),
            help=f"{knob.help} (${knob.env}; default {knob.default()})",
        )


def engine_settings(ns: argparse.Namespace) -> Settings:
    """The ``Settings`` :func:`engine_flags` parsed."""
    values: dict[str, Any] = {}
    for knob in KNOBS:
        number: float = getattr(ns, knob.dest)
        values[knob.field] = number * knob.unit if knob.unit is not None else number
    return Settings(**values)


def gpu_resource_flag(parser: argparse.ArgumentParser) -> None:
    """``--gpu-resource``: the extended resource that counts GPUs on nodes and in pods."""
    parser.add_argument(
        "--gpu-resource",
        default=env_value("JOBTREE_GPU_RESOURCE", DEFAULT_GPU_RESOURCE),
        help="extended resource that counts GPUs on nodes and in pod limits "
        "($JOBTREE_GPU_RESOURCE; default %(default)s)",
    )


def owner_globs_flag(parser: argparse.ArgumentParser) -> None:
    """``--default-owner-globs``: the owners a namespace without the owners annotation may name.
    Admission and the binder must agree, so both declare it here (default: nobody)."""
    parser.add_argument(
        "--default-owner-globs",
        default=env_value("JOBTREE_DEFAULT_OWNER_GLOBS", ",".join(DEFAULT_OWNER_GLOBS)),
        help="owner globs for namespaces without the owners annotation (comma separated; "
        "default: none, such a namespace may name no owner; $JOBTREE_DEFAULT_OWNER_GLOBS)",
    )


def namespace_flag(parser: argparse.ArgumentParser) -> None:
    """``--namespace``: watch the Runs and Reservations of one namespace only."""
    parser.add_argument(
        "--namespace",
        default=env_value("JOBTREE_NAMESPACE", "") or None,
        help="watch Runs and Reservations of one namespace only ($JOBTREE_NAMESPACE; default: all)",
    )
