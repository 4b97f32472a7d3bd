"""``kubectl-runs``: the executable kubectl's plugin discovery runs as ``kubectl runs``."""

from __future__ import annotations

import sys

from services.kubectl_runs.cli import run


def main() -> int:
    """Console-script entry point; returns the exit status."""
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
