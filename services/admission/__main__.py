"""``jobtree-admission`` / ``python -m services.admission``: run the admission service."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.admission.config import parse_args
from services.admission.service import AdmissionService
from shared.bus import configure_logging
from shared.bus.tracing import configure_tracing

log = logging.getLogger("services.admission")


async def serve(argv: list[str] | None = None) -> None:
    """Start admission and serve until SIGTERM/SIGINT."""
    config = parse_args(argv)
    configure_logging(config.service.log_level, config.service.log_format, service="admission")
    configure_tracing("jobtree-admission", config.service.otlp_endpoint)
    service = AdmissionService(config)
    await service.start()
    await service.run_until_stopped()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(argv))


if __name__ == "__main__":
    main()
