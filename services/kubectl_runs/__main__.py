"""``kubectl-runs``: the executable kubectl's plugin discovery runs as ``kubectl runs``."""

from __future__ import annotations

import logging
import sys

from services.kubectl_runs.commands import run


def main() -> int:
    """Console-script entry point; returns the exit status."""
    logging.basicConfig(level=logging.CRITICAL, format="%(message)s")
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
