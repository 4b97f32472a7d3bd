"""``kubectl runs owners``: which owners this namespace's Runs may name, and why.

Reads the Namespace (its owners annotation), the admission Deployment (its default globs) and
the Budgets (the owners there are), each only when the caller may; what could not be read is
said, never guessed.
"""

from __future__ import annotations

import argparse
from typing import Any

from services.kubectl_runs import render
from services.kubectl_runs.commands import CliError, Context, explain_error, list_objects
from services.kubectl_runs.version import jobtree_deployments
from shared.cli.owners import owners_record
from shared.kube.client import KubeError, request
from shared.kube.resources import BUDGETS, NAMESPACES, Resource

FORBIDDEN = (401, 403)


async def _optional(
    ctx: Context, resource: Resource, selector: str | None = None
) -> list[dict[str, Any]] | None:
    """The list, or None when the caller may not read it (or it is not served)."""
    try:
        api = await ctx.api()
        return await list_objects(api, resource, label_selector=selector, timeout=ctx.timeout)
    except KubeError as exc:
        if exc.status in (*FORBIDDEN, 404):
            return None
        raise CliError(explain_error(exc, resource.plural)) from exc


async def cmd_owners(ctx: Context, args: argparse.Namespace) -> int:
    namespace_obj: dict[str, Any] | None = None
    readable = True
    try:
        path = NAMESPACES.path(None, ctx.namespace)
        namespace_obj = await request(await ctx.api(), "GET", path, timeout=ctx.timeout)
    except KubeError as exc:
        if exc.status in FORBIDDEN:
            readable = False  # the annotation decides, and it cannot be read
        elif exc.status != 404:
            raise CliError(explain_error(exc, f"namespace {ctx.namespace}")) from exc
    admissions = await jobtree_deployments(ctx) or []
    budgets = await _optional(ctx, BUDGETS)
    record = owners_record(ctx.namespace, namespace_obj, admissions, budgets)
    record["namespaceReadable"] = readable
    if not readable:
        record["source"] = (
            f"unknown: you may not read namespace {ctx.namespace} (its annotation decides); "
            + record["source"]
        )

    def table() -> str:
        pairs = [
            ("Namespace", record["namespace"]),
            ("Owner globs", ", ".join(record["globs"]) or "none: no owner is authorised"),
            ("Source", record["source"]),
        ]
        if "budgetOwners" in record:
            pairs.append(("Budget owners", ", ".join(record["budgetOwners"]) or "none"))
            pairs.append(("Not allowed", ", ".join(record["otherBudgetOwners"]) or "none"))
        else:
            pairs.append(("Budget owners", "unknown: you may not list Budgets"))
        return render.fields(pairs, width=ctx.width)

    ctx.emit(record, table, names=lambda: [f"namespace/{record['namespace']}"])
    return 0
