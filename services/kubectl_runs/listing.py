"""``kubectl runs list``: the namespace's (or, with ``-A``, every) Run, one row each.

Runs are listed with the label selector ``-l``; their Reservations (for the ETA), open Leases
and Nodes (for ``-o wide``'s domains) are read when permitted and left out when not, so a
researcher who may only list Runs still gets every column the Runs themselves answer.
"""

from __future__ import annotations

import argparse

from services.kubectl_runs import render
from services.kubectl_runs.commands import CliError, Context, _list, _list_optional
from shared.api.lease import LABEL_NAMESPACE
from shared.cli import listing, views
from shared.kube.resources import GPU_LEASES, NODES, RESERVATIONS, RUNS


async def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    namespace = None if ctx.all_namespaces else ctx.namespace
    runs = await _list(ctx, RUNS, "runs", namespace=namespace, label_selector=args.selector)
    reservations = await _list_optional(ctx, RESERVATIONS, namespace=namespace)
    selector = None if namespace is None else f"{LABEL_NAMESPACE}={namespace}"
    leases = await _list_optional(ctx, GPU_LEASES, label_selector=selector)
    nodes = await _list_optional(ctx, NODES) if leases else []
    rows = listing.list_rows(runs, reservations, leases, nodes, ctx.now())
    rows = [r for r in rows if listing.matches(r, args.owner, args.phase)]
    try:
        rows = listing.sort_rows(rows, args.sort)
    except views.ViewError as exc:
        raise CliError(str(exc)) from exc
    if not rows and ctx.output in ("table", "wide"):
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        ctx.note(f"No runs found in {where}.")
        return 0
    every = namespace is None

    def table(wide: bool) -> str:
        headers = ["NAMESPACE"] if every else []
        headers += ["NAME", "OWNER", "PHASE", "REASON", "WIDTH", "ETA", "AGE"]
        if wide:
            headers += ["FUNDING", "DOMAINS", "RESERVATION"]
        body = []
        for r in rows:
            cells = [r["namespace"]] if every else []
            cells += [r["name"], r["owner"], r["phase"], r["reason"]]
            cells += [listing.width_cell(r["width"]), r["eta"], r["age"]]
            if wide:
                cells += [listing.funding_cell(r["funding"]), r["domains"], r["reservation"]]
            body.append(cells)
        return render.table(headers, body, width=ctx.width)

    ctx.emit(
        rows,
        lambda: table(False),
        wide=lambda: table(True),
        names=lambda: [f"runs.rq.davidlangworthy.io/{r['name']}" for r in rows],
        headed=True,
    )
    return 0
