"""``jobtree-packer`` / ``python -m services.packer``: run the packer service.

Besides the flags every service takes (``--nats-url``, ``--kubeconfig``, ``--http-port``,
``--log-level``, ``--log-format``), the packer reads the engine settings every service shares
(``shared.bus.settings``, the node grace among them) and the GPU resource.
"""

from __future__ import annotations

import argparse

from services.packer.service import PackerOptions, serve
from shared.bus.config import ServiceConfig, parse_service_args
from shared.bus.process import run_main
from shared.bus.settings import engine_flags, engine_settings, gpu_resource_flag


def parse_args(argv: list[str] | None = None) -> tuple[ServiceConfig, PackerOptions]:
    """The common service settings plus the packer's own options."""
    parser = argparse.ArgumentParser(prog="jobtree-packer", add_help=False)
    gpu_resource_flag(parser)
    engine_flags(parser)
    ns, cfg = parse_service_args("packer", parser, argv)
    return cfg, PackerOptions(gpu_resource=ns.gpu_resource, settings=engine_settings(ns))


def main(argv: list[str] | None = None) -> None:
    run_main("packer", parse_args, serve, argv)


if __name__ == "__main__":
    main()
