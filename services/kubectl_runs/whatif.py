"""``kubectl runs plan -f run.yaml``: the what-if of a Run not yet submitted (read-only).

Lists what the services' caches hold (Nodes, Budgets, Leases, Runs, Reservations), builds the
same engine snapshot and asks ``shared.control.whatif``. Engine settings are the defaults
(``Settings()``): a forecaster started with other ``--conservative-lead-hours`` or
``--horizon-days`` answers conservative ETAs differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shared.cli.expected import expected_text
from shared.cli.views import human_duration
from shared.engine.model import Node, ReservationClaim
from shared.engine.state import ClusterState
from shared.kube.translate import (
    TranslateError,
    budget_record,
    claim_record,
    lease_record,
    node_record,
    reservation_run_key,
    run_request,
)


def hypothetical_run(doc: Any, namespace: str) -> dict[str, Any]:
    """The Run manifest as the API server would store it (namespace defaulted, a uid)."""
    if not isinstance(doc, dict) or doc.get("kind") != "Run":
        raise ValueError("plan -f needs a Run manifest (kind: Run)")
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("namespace", namespace)
    meta.setdefault("uid", "what-if")
    return {**doc, "metadata": meta}


def snapshot(now: datetime, objects: Mapping[str, list[dict[str, Any]]]) -> ClusterState:
    """The engine's view from listed objects (unreadable ones are skipped, as the caches do)."""
    nodes = []
    for obj in objects["nodes"]:
        node = node_record(obj)
        if isinstance(node, Node):
            nodes.append(node)
    budgets, leases, runs, claims = [], [], {}, []
    for obj in objects["budgets"]:
        try:
            budgets.append(budget_record(obj))
        except (TranslateError, ValueError):
            continue
    for obj in objects["leases"]:
        try:
            leases.append(lease_record(obj))
        except (TranslateError, ValueError):
            continue
    for obj in objects["runs"]:
        try:
            request = run_request(obj)
        except (TranslateError, ValueError):
            continue
        runs[request.key] = request
    for obj in objects["reservations"]:
        try:
            claim: ReservationClaim | None = claim_record(obj, runs.get(reservation_run_key(obj)))
        except (TranslateError, ValueError):
            continue
        if claim is not None:
            claims.append(claim)
    return ClusterState.build(
        now=now, nodes=nodes, budgets=budgets, ledger=leases, runs=runs, claims=claims
    )


def render(record: Mapping[str, Any]) -> str:
    """The what-if for people."""
    lines = [f"Run:       {record['run']} (owner {record.get('owner')}) — not submitted"]
    if record.get("startsNow"):
        nodes = ", ".join(f"{n}×{g}" for n, g in sorted(record["nodes"].items()))
        paying = ", ".join(f"{e} ({g} GPUs)" for e, g in sorted(record["paying"].items()))
        lines += [
            f"Starts:    now, {record['width']} GPUs",
            f"Where:     {nodes}",
            f"Paid by:   {paying}",
        ]
        return "\n".join(lines)
    eta = record["earliestStart"]
    lines += [
        f"Starts:    not now — {record['reason']} ({record['stage']}): {record['message']}",
        f"Guarantee: {eta} (in {human_duration(record['earliestStartInSeconds'])}, "
        f"{record['confidence']})",
        f"Expected:  {expected_text(record['expected'], eta)}",
        f"Deficit:   {record['deficitGPUs']} GPUs in {record['scope']}",
    ]
    if record.get("paying"):
        lines.append(f"Paid by:   {record['paying']}")
    if record.get("slice"):
        lines.append(f"Slice:     {', '.join(record['slice'])}")
    if record.get("openClaims"):
        lines.append(f"Waits on:  {', '.join(record['openClaims'])} (no walltime)")
    risk = record.get("atRisk") or []
    if risk:
        lines.append("At risk if activation had to cut now:")
        lines += [f"  {r['run']:<40} kill probability {r['killProbability']:.2f}" for r in risk]
    return "\n".join(lines)
