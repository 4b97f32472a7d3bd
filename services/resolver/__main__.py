"""``jobtree-resolver`` / ``python -m services.resolver``: run the resolver service."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.forecast.config import engine_flags, engine_settings, env
from services.resolver.service import ResolverOptions, serve
from shared.bus import ServiceConfig, configure_logging, service_args
from shared.bus.tracing import configure_tracing


def parse_args(argv: list[str] | None = None) -> tuple[ServiceConfig, ResolverOptions]:
    """Resolver flags, then the common service flags from what remains."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jobtree-resolver", add_help=False)
    parser.add_argument(
        "--commit-timeout",
        type=float,
        default=float(env("JOBTREE_COMMIT_TIMEOUT", "60")),
        help="seconds to wait for the binder's COMMIT answer ($JOBTREE_COMMIT_TIMEOUT)",
    )
    parser.add_argument(
        "--commit-resends",
        type=int,
        default=int(env("JOBTREE_COMMIT_RESENDS", "2")),
        help="an unanswered COMMIT is sent again this many times ($JOBTREE_COMMIT_RESENDS)",
    )
    parser.add_argument(
        "--conflict-retries",
        type=int,
        default=int(env("JOBTREE_CONFLICT_RETRIES", "3")),
        help="binder rejections retried on a fresh snapshot ($JOBTREE_CONFLICT_RETRIES)",
    )
    engine_flags(parser)
    if "-h" in args or "--help" in args:
        print(parser.format_help())
    ns, rest = parser.parse_known_args(args)
    cfg = service_args("resolver", rest)
    return cfg, ResolverOptions(
        commit_timeout=ns.commit_timeout,
        commit_resends=max(0, ns.commit_resends),
        conflict_retries=max(1, ns.conflict_retries),
        gpu_resource=ns.gpu_resource,
        namespace=ns.namespace,
        settings=engine_settings(ns),
    )


def main(argv: list[str] | None = None) -> None:
    cfg, options = parse_args(argv)
    configure_logging(cfg.log_level, cfg.log_format, service="resolver")
    configure_tracing("jobtree-resolver", cfg.otlp_endpoint)
    sys.exit(asyncio.run(serve(cfg, options)))


if __name__ == "__main__":
    main()
