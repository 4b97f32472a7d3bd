"""``jobtree-forecast`` / ``python -m services.forecast``: run the forecast service."""

from __future__ import annotations

from services.forecast.config import parse_args
from services.forecast.service import serve
from shared.bus.process import run_main


def main(argv: list[str] | None = None) -> None:
    run_main("forecast", parse_args, serve, argv)


if __name__ == "__main__":
    main()
