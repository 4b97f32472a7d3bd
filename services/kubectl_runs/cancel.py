"""``kubectl runs cancel``: delete Runs (what ``scancel`` is to Slurm, ``kubectl delete run`` here).

Deleting the Run is the whole protocol: the binder sees it gone and closes every open Lease
``Canceled`` (the Leases stay: they are the ledger budgets are charged from), deletes the Run's
pods (they are also owned by the Run, so the garbage collector removes any left) and its
Service; a pending Reservation is cancelled by the forecaster. On a terminal the command lists
what it is about to cancel and asks; ``--yes`` (or input that is not a terminal, as with
``kubectl delete``) skips the question.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from services.kubectl_runs.commands import (
    CliError,
    Context,
    _list,
    _list_optional,
    explain_error,
    find_run,
)
from shared.cli import listing, views
from shared.kube.client import KubeError, request
from shared.kube.resources import GPU_LEASES, RUNS


def describe(item: Mapping[str, Any]) -> str:
    text = f"{item['run']} ({item['phase']}"
    if item["openLeases"]:
        text += f", {item['gpus']} GPUs on {item['openLeases']} open leases"
    return text + ")"


def confirm(items: list[dict[str, Any]]) -> bool:
    """Ask on the terminal; anything but y/yes declines."""
    print("About to cancel (delete):", file=sys.stderr)
    for item in items:
        print(f"  {describe(item)}", file=sys.stderr)
    print(
        "Open leases close Canceled (kept as the ledger) and the pods are deleted.",
        file=sys.stderr,
    )
    print("Cancel these runs? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()  # "" at end of input: declined
    return answer.strip().lower() in ("y", "yes")


async def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    if not args.runs and not args.selector:
        raise CliError("name the Runs to cancel (RUN…) or select them with -l")
    runs = [await find_run(ctx, text) for text in args.runs]
    if args.selector:
        namespace = None if ctx.all_namespaces else ctx.namespace
        runs += await _list(ctx, RUNS, "runs", namespace=namespace, label_selector=args.selector)
    unique = {views.run_key_of(r): r for r in runs}
    if not unique:
        raise CliError(f"no runs match the selector {args.selector!r}")
    items = []
    for key, run in unique.items():
        selector = views.lease_selector(key)
        items.append(
            listing.cancel_summary(
                run, await _list_optional(ctx, GPU_LEASES, label_selector=selector)
            )
        )
    if not args.yes and sys.stdin.isatty() and not confirm(items):
        raise CliError("cancelled nothing")
    api = await ctx.api()
    for (namespace, name), item in zip(unique, items, strict=True):
        try:
            await request(
                api,
                "DELETE",
                RUNS.path(namespace, name),
                query=[("propagationPolicy", "Background")],
                timeout=ctx.timeout,
            )
        except KubeError as exc:
            if exc.status != 404:
                raise CliError(explain_error(exc, f'run "{namespace}/{name}"')) from exc
            item["result"] = "already gone"
        else:
            item["result"] = "deleted"
    ctx.emit(
        items,
        lambda: "\n".join(
            f"runs.rq.davidlangworthy.io/{i['run'].rpartition('/')[2]} {i['result']}"
            + (f" ({i['openLeases']} open leases close Canceled)" if i["openLeases"] else "")
            for i in items
        ),
        names=lambda: [f"runs.rq.davidlangworthy.io/{i['run'].rpartition('/')[2]}" for i in items],
    )
    return 0
