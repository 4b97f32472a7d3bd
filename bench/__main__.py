"""Runs every ``bench/bench_*.py`` in its own interpreter (so memory figures stay independent)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    failed = 0
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        done = subprocess.run([sys.executable, "-m", f"bench.{path.stem}"], check=False)
        failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
