"""``jobtree-resolver`` / ``python -m services.resolver``: run the resolver service."""

from __future__ import annotations

import argparse
from datetime import timedelta

from services.forecast.config import engine_flags, engine_settings
from services.resolver.service import ResolverOptions, serve
from shared.bus.config import ServiceConfig, env_value, parse_service_args
from shared.bus.process import run_main


def parse_args(argv: list[str] | None = None) -> tuple[ServiceConfig, ResolverOptions]:
    """Resolver flags, then the common service flags from what remains."""
    parser = argparse.ArgumentParser(prog="jobtree-resolver", add_help=False)
    parser.add_argument(
        "--commit-timeout",
        type=float,
        default=float(env_value("JOBTREE_COMMIT_TIMEOUT", "60")),
        help="seconds to wait for the binder's COMMIT answer ($JOBTREE_COMMIT_TIMEOUT)",
    )
    parser.add_argument(
        "--commit-resends",
        type=int,
        default=int(env_value("JOBTREE_COMMIT_RESENDS", "2")),
        help="an unanswered COMMIT is sent again this many times ($JOBTREE_COMMIT_RESENDS)",
    )
    parser.add_argument(
        "--conflict-retries",
        type=int,
        default=int(env_value("JOBTREE_CONFLICT_RETRIES", "3")),
        help="binder rejections retried on a fresh snapshot ($JOBTREE_CONFLICT_RETRIES)",
    )
    parser.add_argument(
        "--node-grace-seconds",
        type=float,
        default=float(env_value("JOBTREE_NODE_GRACE_SECONDS", "30")),
        help="act on NODE_FAILED only for a node deleted or NotReady this long, as the packer "
        "($JOBTREE_NODE_GRACE_SECONDS)",
    )
    engine_flags(parser)
    ns, cfg = parse_service_args("resolver", parser, argv)
    return cfg, ResolverOptions(
        commit_timeout=ns.commit_timeout,
        commit_resends=max(0, ns.commit_resends),
        conflict_retries=max(1, ns.conflict_retries),
        gpu_resource=ns.gpu_resource,
        namespace=ns.namespace,
        node_grace=timedelta(seconds=ns.node_grace_seconds),
        settings=engine_settings(ns),
    )


def main(argv: list[str] | None = None) -> None:
    run_main("resolver", parse_args, serve, argv)


if __name__ == "__main__":
    main()
