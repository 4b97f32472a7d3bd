"""``kubectl runs logs``: the log of one rank of a Run, read from its pod like ``kubectl logs``.

The binder labels every pod with its Run, group and rank, so the rank's pod is a label query in
the Run's namespace (the active pod when a spare of the same rank also exists). The log itself
is the pod's ``log`` subresource, streamed to stdout as it arrives (``-f`` keeps following).
The API server fetches it from the node's kubelet, so a pod that was never scheduled, or runs on
a node without a kubelet, has no log: the server's reason is reported.
"""

from __future__ import annotations

import argparse
import sys

import aiohttp

from services.kubectl_runs.commands import CliError, Context, _list, explain_error, run_ref
from shared.cli import views
from shared.kube.client import KubeError, open_stream
from shared.kube.resources import PODS
from shared.kube.translate import LABEL_GROUP, LABEL_RANK

CHUNK = 64 * 1024


def log_query(args: argparse.Namespace) -> list[tuple[str, str | int]]:
    """The ``log`` subresource's parameters for the flags given."""
    query: list[tuple[str, str | int]] = []
    if args.container:
        query.append(("container", args.container))
    if args.follow:
        query.append(("follow", "true"))
    if args.tail is not None:
        query.append(("tailLines", args.tail))
    if args.previous:
        query.append(("previous", "true"))
    return query


def log_error(exc: KubeError, label: str, node: str) -> str:
    """Why the API server gave no log: a 404 for the ``log`` subresource means the node's
    kubelet did not serve it (a node without a kubelet, like KWOK's, never does)."""
    if exc.status == 404 and "could not find the requested resource" in exc.message:
        return (
            f"logs of {label}: the API server could not get them from node {node}'s kubelet "
            f"({exc.message}); nodes without a real kubelet (KWOK) have no logs"
        )
    return explain_error(exc, f"logs of {label}")


async def cmd_logs(ctx: Context, args: argparse.Namespace) -> int:
    namespace, name = run_ref(ctx, args.run)
    selector = (
        views.pod_selector(("", name)) + f",{LABEL_GROUP}={args.group},{LABEL_RANK}={args.rank}"
    )
    pods = await _list(ctx, PODS, "pods", namespace=namespace, label_selector=selector)
    if not pods:
        everyone = await _list(
            ctx, PODS, "pods", namespace=namespace, label_selector=views.pod_selector(("", name))
        )
        ranks = sorted({f"{r['group']}/{r['rank']}" for r in views.pod_rows(everyone, ctx.now())})
        known = f" (group/rank of its pods: {', '.join(ranks)})" if ranks else " (it has no pods)"
        raise CliError(f'run "{name}": no pod for group {args.group} rank {args.rank}{known}')
    rows = views.pod_rows(pods, ctx.now())
    spaces = {views.namespace_of(p) for p in pods}
    if len(spaces) > 1:
        raise CliError(f'run "{name}" has pods in several namespaces: use NAMESPACE/NAME')
    chosen = next((r for r in rows if r["role"] != "Spare"), rows[0])
    pod_namespace = spaces.pop() or ctx.namespace
    label = f"pod {pod_namespace}/{chosen['name']}"
    if not chosen["node"]:
        raise CliError(f"logs of {label}: it is not on a node yet ({chosen['phase']}): no log")
    path = PODS.path(pod_namespace, chosen["name"], "log")
    timeout = aiohttp.ClientTimeout(total=None if args.follow else ctx.timeout, connect=ctx.timeout)
    try:
        response = await open_stream(await ctx.api(), path, query=log_query(args), timeout=timeout)
    except KubeError as exc:
        raise CliError(log_error(exc, label, chosen["node"])) from exc
    out = sys.stdout.buffer
    try:
        async with response:
            async for chunk in response.content.iter_chunked(CHUNK):
                out.write(chunk)
                out.flush()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(
            f"logs of pod {pod_namespace}/{chosen['name']}: stream broke: {exc}"
        ) from exc
    return 0
