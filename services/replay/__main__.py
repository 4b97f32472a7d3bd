"""``jobtree-replay``: replay a trace of arrivals against a fleet and Budgets given as manifests.

A what-if for an administrator sizing envelopes: the same engine the services run, on a
simulated clock, printing the replay's figures (waits, ETA errors, broken promises, lottery
kills, utilisation, forecast latency) as one JSON object.

Trace: CSV with a header, or JSON (a list of objects), one arrival per row with ``name``,
``owner``, ``arrival`` (offset from the start), ``gpus``, ``walltime``, ``runtime`` and
optionally ``groupGPUs`` and ``flavor``. Times are seconds or durations such as ``1h30m``.
Manifests: YAML files holding Node and Budget objects (``kind: Node`` with its labels and
``status.allocatable``; ``kind: Budget`` as applied to the cluster).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import yaml

from services.replay.simulate import Job, Replay
from shared.api.common import parse_duration
from shared.engine.model import Budget, Node
from shared.engine.state import Settings
from shared.kube.translate import TranslateError, budget_record, node_record, parse_time


class TraceError(ValueError):
    """A trace row or manifest that cannot be replayed; the message names the field."""


def _span(value: object, where: str) -> timedelta:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=float(value))
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return timedelta(seconds=float(text))
        except ValueError:
            pass
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise TraceError(f"{where}: {exc}") from exc
    raise TraceError(f"{where}: expected seconds or a duration such as 1h30m, got {value!r}")


def _count(value: object, where: str) -> int:
    try:
        number = int(str(value))
    except ValueError as exc:
        raise TraceError(f"{where}: expected a whole number, got {value!r}") from exc
    if number < 1:
        raise TraceError(f"{where}: must be at least 1, got {number}")
    return number


def job_of(row: Mapping[str, Any], index: int) -> Job:
    """One trace row as a Job; TraceError naming the row and field when it is not one."""
    where = f"row {index + 1}"
    for key in ("name", "owner", "arrival", "gpus", "walltime", "runtime"):
        if row.get(key) in (None, ""):
            raise TraceError(f"{where}: missing field {key!r}")
    group = row.get("groupGPUs")
    job = Job(
        name=str(row["name"]),
        owner=str(row["owner"]),
        arrival=_span(row["arrival"], f"{where} arrival"),
        gpus=_count(row["gpus"], f"{where} gpus"),
        walltime=_span(row["walltime"], f"{where} walltime"),
        runtime=_span(row["runtime"], f"{where} runtime"),
        group_gpus=_count(group, f"{where} groupGPUs") if group not in (None, "") else None,
        flavor=str(row.get("flavor") or "H100-80GB"),
    )
    if job.walltime <= timedelta(0):
        raise TraceError(f"{where} walltime: must be positive")
    return job


def read_trace(path: Path) -> tuple[Job, ...]:
    text = path.read_text()
    rows: Iterable[Mapping[str, Any]]
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TraceError(f"{path}: a JSON trace is a list of objects")
        rows = data
    else:
        rows = list(csv.DictReader(text.splitlines()))
    jobs = tuple(job_of(row, i) for i, row in enumerate(rows))
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise TraceError(f"{path}: job names must be unique")
    return jobs


def read_manifests(paths: Sequence[Path]) -> tuple[tuple[Node, ...], tuple[Budget, ...]]:
    nodes: list[Node] = []
    budgets: list[Budget] = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            items = doc.get("items") if doc.get("kind") == "List" else [doc]
            for obj in items or ():
                kind = obj.get("kind")
                name = (obj.get("metadata") or {}).get("name")
                try:
                    if kind == "Node":
                        node = node_record(obj)
                        if not isinstance(node, Node):
                            raise TraceError(f"{path}: Node {name}: {node}")
                        nodes.append(node)
                    elif kind == "Budget":
                        budgets.append(budget_record(obj))
                except (TranslateError, ValueError, KeyError) as exc:
                    if isinstance(exc, TraceError):
                        raise
                    raise TraceError(f"{path}: {kind} {name}: {exc}") from exc
    if not nodes:
        raise TraceError("the manifests hold no Node")
    if not budgets:
        raise TraceError("the manifests hold no Budget")
    return tuple(nodes), tuple(budgets)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="jobtree-replay",
        description="Replay a trace of arrivals through the Jobtree engine (what-if).",
    )
    parser.add_argument("--trace", type=Path, required=True, help="CSV or JSON trace")
    parser.add_argument(
        "-f",
        "--manifests",
        type=Path,
        action="append",
        required=True,
        help="YAML with Node and Budget objects (repeatable)",
    )
    parser.add_argument(
        "--start",
        default="2026-01-05T00:00:00Z",
        help="instant the trace's offsets count from (RFC 3339; Budget windows are absolute)",
    )
    parser.add_argument("--conservative-lead-hours", type=float, default=24.0)
    parser.add_argument("--default-duration-hours", type=float, default=24.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        jobs = read_trace(ns.trace)
        nodes, budgets = read_manifests(ns.manifests)
        start = parse_time(ns.start).astimezone(UTC)
    except (TraceError, OSError, ValueError, yaml.YAMLError) as exc:
        print(f"jobtree-replay: {exc}", file=sys.stderr)
        return 2
    settings = Settings(
        conservative_lead=timedelta(hours=ns.conservative_lead_hours),
        default_duration=timedelta(hours=ns.default_duration_hours),
    )
    figures = Replay(nodes, budgets, jobs, start, settings).run()
    print(json.dumps({"start": start.isoformat(), **figures.as_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
