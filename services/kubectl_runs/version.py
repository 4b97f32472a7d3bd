"""``kubectl runs version``: this client's version and, when reachable, the server side.

The server side is what the API server says: its own ``/version``, whether it serves the
Jobtree API group (and which versions), and the Jobtree service Deployments the caller may list
(``shared.cli.deployments``: one row per service container, with its image, the
``app.kubernetes.io/version`` label and ready replicas). ``--client`` contacts nothing.
"""

from __future__ import annotations

import argparse
from importlib import metadata
from typing import Any

from services.kubectl_runs import render
from services.kubectl_runs.commands import CliError, Context, explain_error, list_objects
from shared.api import GROUP
from shared.cli.deployments import SELECTORS, service_rows
from shared.kube.client import KubeError, request
from shared.kube.resources import DEPLOYMENTS


def client_version() -> str:
    try:
        return metadata.version("jobtree")
    except metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


async def jobtree_deployments(ctx: Context) -> list[dict[str, Any]] | None:
    """Deployments labelled as Jobtree's (chart or Kustomize), or None when not allowed."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    api = await ctx.api()
    for selector in SELECTORS:
        try:
            items = await list_objects(
                api, DEPLOYMENTS, label_selector=selector, timeout=ctx.timeout
            )
        except KubeError as exc:
            if exc.status in (401, 403, 404):
                return None
            raise CliError(explain_error(exc, "deployments")) from exc
        for item in items:
            meta = item.get("metadata") or {}
            found[(str(meta.get("namespace")), str(meta.get("name")))] = item
    return list(found.values())


async def cmd_version(ctx: Context, args: argparse.Namespace) -> int:
    record: dict[str, Any] = {"client": {"version": client_version()}}
    if not args.client:
        api = await ctx.api()
        try:
            server = await request(api, "GET", "/version", timeout=ctx.timeout)
        except KubeError as exc:
            raise CliError(explain_error(exc, "server version")) from exc
        record["server"] = {
            "gitVersion": server.get("gitVersion"),
            "platform": server.get("platform"),
        }
        try:
            group = await request(api, "GET", f"/apis/{GROUP}", timeout=ctx.timeout)
            record["api"] = [v.get("groupVersion") for v in group.get("versions") or ()]
        except KubeError as exc:
            if exc.status != 404:
                raise CliError(explain_error(exc, f"API group {GROUP}")) from exc
            record["api"] = []
        deployments = await jobtree_deployments(ctx)
        record["services"] = None if deployments is None else service_rows(deployments)

    def table() -> str:
        lines = [f"Client Version: {record['client']['version']}"]
        if "server" in record:
            lines.append(f"Server Version: {record['server']['gitVersion']}")
            served = ", ".join(record["api"]) or f"not served ({GROUP} CRDs not installed)"
            lines.append(f"Jobtree API:    {served}")
            services = record["services"]
            if services is None:
                lines.append("Services:       unknown (you may not list Deployments)")
            elif not services:
                lines.append("Services:       none found (no Jobtree service Deployments visible)")
            else:
                rows = [
                    [s["service"], s["deployment"], s["version"], s["image"], s["ready"]]
                    for s in services
                ]
                lines.append("")
                lines.append(
                    render.table(
                        ["SERVICE", "DEPLOYMENT", "VERSION", "IMAGE", "READY"],
                        rows,
                        width=ctx.width,
                    )
                )
        return "\n".join(lines)

    ctx.emit(record, table, names=lambda: [])
    return 0
