"""Start-up of ``kubectl runs`` (``python -m bench.bench_cli_start``): one JSON line per figure.

Every sample is a fresh interpreter, as a shell's TAB or ``--help`` is. Figures:

* ``python_start`` — baseline measured in the same run: ``python -c pass``.
* ``import_command_stack`` — baseline: importing every command module (API client, models,
  engine, views): what each ``--help`` and TAB paid before the tree moved to ``cli``.
* ``help`` — ``kubectl-runs --help``. Target ≤ 300 ms on the project's 2-core machine.
* ``complete_command`` — ``kubectl-runs __complete plan -o ""`` (no cluster asked). Target ≤ 300 ms.

Each line has wall-clock p50/p99 and the median CPU time (user + system) of the child, which
is what the start-up costs on an idle machine when others share the cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.common import emit

STACK = (
    "import services.kubectl_runs.commands, services.kubectl_runs.listing, "
    "services.kubectl_runs.cancel, services.kubectl_runs.logs, services.kubectl_runs.owners, "
    "services.kubectl_runs.version"
)
CASES = {
    "python_start": ["-c", "pass"],
    "import_command_stack": ["-c", STACK],
    "help": ["-m", "services.kubectl_runs", "--help"],
    "complete_command": ["-m", "services.kubectl_runs", "__complete", "plan", "-o", ""],
}


def sample(args: list[str]) -> tuple[float, float]:
    """(wall ms, CPU ms) of one child interpreter."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.perf_counter() - start) * 1000.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args} exited {proc.returncode}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=15, help="samples per figure")
    n = parser.parse_args().n
    for figure, args in CASES.items():
        sample(args)  # warm the page cache and the bytecode cache
        walls, cpus = zip(*(sample(args) for _ in range(n)), strict=True)
        emit(figure, list(walls), cpu_p50_ms=round(sorted(cpus)[len(cpus) // 2], 1))


if __name__ == "__main__":
    main()
