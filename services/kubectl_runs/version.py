"""``kubectl runs version``: this client's version and, when reachable, the server side.

The server side is what the API server says: its own ``/version``, whether it serves the
Jobtree API group (and which versions), and the Jobtree service Deployments the caller may list
(image, ``app.kubernetes.io/version`` label, ready replicas). ``--client`` contacts nothing.
"""

from __future__ import annotations

import argparse
from importlib import metadata
from typing import Any

from services.kubectl_runs import render
from services.kubectl_runs.commands import CliError, Context, explain_error, list_objects
from shared.api import GROUP
from shared.kube.client import KubeError, request
from shared.kube.resources import DEPLOYMENTS

SERVICES = ("admission", "packer", "forecast", "resolver", "binder")
SELECTOR = f"app.kubernetes.io/component in ({','.join(SERVICES)})"
VERSION_LABEL = "app.kubernetes.io/version"


def client_version() -> str:
    try:
        return metadata.version("jobtree")
    except metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def service_row(deployment: dict[str, Any]) -> dict[str, Any] | None:
    """A Jobtree service Deployment (one running ``jobtree-<service>``), else None."""
    meta = deployment.get("metadata") or {}
    labels = meta.get("labels") or {}
    spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = spec.get("containers") or []
    first = containers[0] if containers else {}
    words = [str(w) for w in (*(first.get("command") or ()), *(first.get("args") or ()))]
    component = labels.get("app.kubernetes.io/component")
    if component not in SERVICES or not any(
        w.startswith("jobtree-") or w in SERVICES for w in words
    ):
        return None
    status = deployment.get("status") or {}
    wanted = (deployment.get("spec") or {}).get("replicas", 1)
    return {
        "service": component,
        "deployment": f"{meta.get('namespace')}/{meta.get('name')}",
        "image": first.get("image"),
        "version": labels.get(VERSION_LABEL),
        "ready": f"{status.get('readyReplicas') or 0}/{wanted}",
    }


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
        try:
            found = await list_objects(
                api, DEPLOYMENTS, label_selector=SELECTOR, timeout=ctx.timeout
            )
            record["services"] = [r for d in found if (r := service_row(d)) is not None]
        except KubeError as exc:
            if exc.status not in (401, 403, 404):
                raise CliError(explain_error(exc, "deployments")) from exc
            record["services"] = None

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
