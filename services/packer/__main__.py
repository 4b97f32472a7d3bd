"""``jobtree-packer`` / ``python -m services.packer``: run the packer service.

Besides the flags every service takes (``--nats-url``, ``--kubeconfig``, ``--http-port``,
``--log-level``, ``--log-format``), the packer reads its own, each with an environment fallback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import timedelta

from services.packer.service import PackerOptions, serve
from shared.bus import ServiceConfig, configure_logging, service_args
from shared.bus.tracing import configure_tracing
from shared.engine.topology import DEFAULT_GPU_RESOURCE


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[ServiceConfig, PackerOptions]:
    """The common service settings plus the packer's own options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jobtree-packer", add_help=False)
    parser.add_argument(
        "--node-grace-seconds",
        type=_positive,
        default=_positive(os.environ.get("JOBTREE_NODE_GRACE_SECONDS") or "30"),
        help="how long a leased node may be NotReady before NODE_FAILED "
        "($JOBTREE_NODE_GRACE_SECONDS; default %(default)s)",
    )
    parser.add_argument(
        "--gpu-resource",
        default=os.environ.get("JOBTREE_GPU_RESOURCE") or DEFAULT_GPU_RESOURCE,
        help="allocatable extended resource that counts GPUs ($JOBTREE_GPU_RESOURCE; "
        "default %(default)s)",
    )
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
    ns, rest = parser.parse_known_args(argv)
    cfg = service_args("packer", rest)
    return cfg, PackerOptions(
        gpu_resource=ns.gpu_resource, node_grace=timedelta(seconds=ns.node_grace_seconds)
    )


def main(argv: list[str] | None = None) -> None:
    cfg, options = parse_args(argv)
    configure_logging(cfg.log_level, cfg.log_format, service="packer")
    configure_tracing("jobtree-packer", cfg.otlp_endpoint)
    sys.exit(asyncio.run(serve(cfg, options)))


if __name__ == "__main__":
    main()
