"""``jobtree-forecast`` / ``python -m services.forecast``: run the forecast service."""

from __future__ import annotations

import asyncio
import sys

from services.forecast.config import parse_args
from services.forecast.service import serve
from shared.bus import configure_logging
from shared.bus.tracing import configure_tracing


def main(argv: list[str] | None = None) -> None:
    cfg, options = parse_args(argv)
    configure_logging(cfg.log_level, cfg.log_format, service="forecast")
    configure_tracing("jobtree-forecast", cfg.otlp_endpoint)
    sys.exit(asyncio.run(serve(cfg, options)))


if __name__ == "__main__":
    main()
