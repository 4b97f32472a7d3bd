"""``jobtree-binder`` / ``python -m services.binder``: run the binder service.

Besides the flags every service takes (``--nats-url``, ``--kubeconfig``, ``--http-port``,
``--log-level``, ``--log-format``) and the engine settings every service shares
(``shared.bus.settings``: its commit re-checks use them, the missing-pod grace is one), the binder
reads its own, each with an environment fallback.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from services.binder.service import BinderOptions, serve
from shared.bus.config import ServiceConfig, env_value, parse_service_args, truthy
from shared.bus.process import run_main
from shared.bus.settings import engine_flags, engine_settings, gpu_resource_flag, owner_globs_flag
from shared.control import pod_policy
from shared.control.tenancy import parse_globs
from shared.kube.translate import HOLD_IMAGE


def parse_args(argv: list[str] | None = None) -> tuple[ServiceConfig, BinderOptions]:
    """The common service settings plus the binder's own options."""
    parser = argparse.ArgumentParser(prog="jobtree-binder", add_help=False)
    gpu_resource_flag(parser)
    parser.add_argument(
        "--hold-image",
        default=env_value("JOBTREE_HOLD_IMAGE", HOLD_IMAGE),
        help="image of template-less capacity-hold pods ($JOBTREE_HOLD_IMAGE)",
    )
    parser.add_argument(
        "--tick-seconds",
        type=float,
        default=float(env_value("JOBTREE_BINDER_TICK_SECONDS", "1.0")),
        help="lifecycle re-check period: walltime resolution ($JOBTREE_BINDER_TICK_SECONDS)",
    )
    parser.add_argument(
        "--commit-concurrency",
        type=int,
        default=int(env_value("JOBTREE_BINDER_COMMIT_CONCURRENCY", "8")),
        help="commits of different Runs written at once ($JOBTREE_BINDER_COMMIT_CONCURRENCY)",
    )
    parser.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=truthy(env_value("JOBTREE_LEADER_ELECT", "false")),
        help="hold the coordination Lease jobtree-binder before writing ($JOBTREE_LEADER_ELECT)",
    )
    parser.add_argument(
        "--leader-namespace",
        default=env_value("JOBTREE_LEADER_NAMESPACE", env_value("POD_NAMESPACE", "default")),
        help="namespace of the election Lease ($JOBTREE_LEADER_NAMESPACE, $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--leader-lease-seconds",
        type=float,
        default=float(env_value("JOBTREE_LEADER_LEASE_SECONDS", "15")),
        help="election Lease duration ($JOBTREE_LEADER_LEASE_SECONDS)",
    )
    engine_flags(parser)
    pod_policy.add_arguments(parser)
    owner_globs_flag(parser)
    parser.add_argument(
        "--max-clock-skew-seconds",
        type=float,
        default=float(env_value("JOBTREE_MAX_CLOCK_SKEW_SECONDS", "120")),
        help="how far a new Lease's start may be from the binder's clock "
        "($JOBTREE_MAX_CLOCK_SKEW_SECONDS)",
    )
    ns, cfg = parse_service_args("binder", parser, argv)
    try:
        policy = pod_policy.from_arguments(ns)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg, BinderOptions(
        gpu_resource=ns.gpu_resource,
        hold_image=ns.hold_image,
        tick_seconds=ns.tick_seconds,
        commit_concurrency=max(1, ns.commit_concurrency),
        leader_elect=ns.leader_elect,
        leader_namespace=ns.leader_namespace,
        leader_lease_seconds=ns.leader_lease_seconds,
        settings=engine_settings(ns),
        pod_policy=policy,
        default_owner_globs=parse_globs(ns.default_owner_globs),
        max_clock_skew=timedelta(seconds=ns.max_clock_skew_seconds),
    )


def main(argv: list[str] | None = None) -> None:
    run_main("binder", parse_args, serve, argv)


if __name__ == "__main__":
    main()
