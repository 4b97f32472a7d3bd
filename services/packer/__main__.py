"""``jobtree-packer`` / ``python -m services.packer``: run the packer service.

Besides the flags every service takes (``--nats-url``, ``--kubeconfig``, ``--http-port``,
``--log-level``, ``--log-format``), the packer reads its own, each with an environment fallback.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from services.packer.service import PackerOptions, serve
from shared.bus.config import ServiceConfig, env_value, parse_service_args
from shared.bus.process import run_main
from shared.engine.topology import DEFAULT_GPU_RESOURCE


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[ServiceConfig, PackerOptions]:
    """The common service settings plus the packer's own options."""
    parser = argparse.ArgumentParser(prog="jobtree-packer", add_help=False)
    parser.add_argument(
        "--node-grace-seconds",
        type=_positive,
        default=_positive(env_value("JOBTREE_NODE_GRACE_SECONDS", "30")),
        help="how long a leased node may be NotReady before NODE_FAILED "
        "($JOBTREE_NODE_GRACE_SECONDS; default %(default)s)",
    )
    parser.add_argument(
        "--gpu-resource",
        default=env_value("JOBTREE_GPU_RESOURCE", DEFAULT_GPU_RESOURCE),
        help="allocatable extended resource that counts GPUs ($JOBTREE_GPU_RESOURCE; "
        "default %(default)s)",
    )
    ns, cfg = parse_service_args("packer", parser, argv)
    return cfg, PackerOptions(
        gpu_resource=ns.gpu_resource, node_grace=timedelta(seconds=ns.node_grace_seconds)
    )


def main(argv: list[str] | None = None) -> None:
    run_main("packer", parse_args, serve, argv)


if __name__ == "__main__":
    main()
