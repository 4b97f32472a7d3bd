"""Engine benchmarks of a base git ref against the working tree, interleaved in one run.

``make bench-compare BASE=<ref>`` (or ``python -m bench.compare --base <ref>``) checks the base ref
out in a temporary git worktree, then runs every engine benchmark alternately on base and head
(base, head, base, head … for ``--rounds`` rounds) with the same interpreter, so both sides see the
same machine under the same load. Figures from different days or machines are not comparable;
figures from one interleaved run are. For every figure it prints base and head p50/p99 (the
median over the rounds of each run's percentile; memory figures in MB) and the head/base ratio,
and flags a figure whose p50 ratio is above ``--threshold`` (1.15). The exit status is 1 when a
figure is flagged. A benchmark or figure only one side has is listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.common import load, machine

ENGINE_BENCHES = ("bench_cover", "bench_pack", "bench_forecast", "bench_accounting", "bench_memory")
"""Pure-engine benchmarks (``bench_e2e`` starts a whole stack and is not compared)."""
REPO = Path(__file__).resolve().parents[1]

Samples = dict[str, dict[str, list[float]]]
"""figure → side ("base"/"head") → one value per round."""


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """The ref checked out (detached) in a temporary worktree, removed afterwards."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="jobtree-bench-base-") as tmp:
        path = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(path), sha],
            cwd=REPO,
            check=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False
            )


def run_bench(root: Path, name: str) -> list[dict[str, object]]:
    """One benchmark run in ``root``'s code (its own interpreter); its JSON lines."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed in {root}:\n{done.stderr[-2000:]}")
    lines = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def collect(lines: Sequence[dict[str, object]], side: str, into: Samples) -> None:
    """Latency figures as ``<figure>`` (p50, p99); memory fields as ``<figure>.<field>``."""
    for line in lines:
        figure = str(line.get("figure"))
        if isinstance(line.get("p50_ms"), int | float):
            for stat in ("p50_ms", "p99_ms"):
                into.setdefault(f"{figure} {stat}", {}).setdefault(side, []).append(
                    float(line[stat])  # type: ignore[arg-type]
                )
        for key, value in line.items():
            if key.endswith("_mb") and key != "target_mb" and isinstance(value, int | float):
                into.setdefault(f"{figure}.{key}", {}).setdefault(side, []).append(float(value))


def table(samples: Samples, threshold: float) -> tuple[list[str], int]:
    """Rows: figure, base p50, head p50, ratio, base p99, head p99, ratio, flag."""
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for name, sides in samples.items():
        figure, _, stat = name.partition(" ")
        med = {side: statistics.median(values) for side, values in sides.items()}
        figures.setdefault(figure, {})[stat or "value"] = med
    rows = [
        f"{'figure':<58} {'base p50':>10} {'head p50':>10} {'ratio':>6} "
        f"{'base p99':>10} {'head p99':>10} {'ratio':>6}"
    ]
    flagged = 0
    for figure in sorted(figures):
        stats = figures[figure]
        p50 = stats.get("p50_ms") or stats.get("value") or {}
        p99 = stats.get("p99_ms", {})
        if "base" not in p50 or "head" not in p50:
            only = "head" if "head" in p50 else "base"
            rows.append(f"{figure:<58} only in {only}: {p50.get(only, 0):.3f}")
            continue
        r50 = p50["head"] / p50["base"] if p50["base"] else float("inf")
        cells = f"{p50['base']:>10.3f} {p50['head']:>10.3f} {r50:>6.2f}"
        if "base" in p99 and "head" in p99:
            r99 = p99["head"] / p99["base"] if p99["base"] else float("inf")
            cells += f" {p99['base']:>10.3f} {p99['head']:>10.3f} {r99:>6.2f}"
        else:
            cells += f" {'':>10} {'':>10} {'':>6}"
        flag = r50 > threshold
        flagged += flag
        rows.append(f"{figure:<58} {cells}" + (f"  SLOWER (> {threshold:g})" if flag else ""))
    return rows, flagged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git ref to compare against (e.g. HEAD~1)")
    parser.add_argument("--rounds", type=int, default=3, help="base/head runs of each benchmark")
    parser.add_argument("--threshold", type=float, default=1.15, help="flag p50 ratios above")
    parser.add_argument(
        "--bench", action="append", choices=ENGINE_BENCHES, help="only these (repeatable)"
    )
    args = parser.parse_args(argv)
    benches = tuple(args.bench or ENGINE_BENCHES)
    print(f"machine: {machine()}; load at start {load()}", flush=True)
    samples: Samples = {}
    with worktree(args.base) as base:
        for r in range(args.rounds):
            for name in benches:
                for side, root in (("base", base), ("head", REPO)):
                    if not (root / "bench" / f"{name}.py").exists():
                        continue
                    print(f"round {r + 1}/{args.rounds}: {name} on {side}", flush=True)
                    collect(run_bench(root, name), side, samples)
    rows, flagged = table(samples, args.threshold)
    print(f"\nbase {args.base} vs head (working tree), median of {args.rounds} interleaved rounds")
    print("\n".join(rows))
    print(f"\nload at end {load()}; {flagged} figure(s) with p50 ratio above {args.threshold:g}")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
