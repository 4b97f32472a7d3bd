"""The ``kubectl runs`` command tree and the thin shell around each command.

Each handler fetches what its view needs from the API server (through ``shared.kube``), reads the
clock once, calls the pure view in ``shared.cli.views`` and prints the record with
``render`` (table) or as JSON / YAML. Failures surface as :class:`CliError`: one line on stderr
and a non-zero exit. Writes are server-side apply (``submit``, field manager ``kubectl-runs``)
or merge patches guarded by the resourceVersion read (``sponsors``, ``shrink``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

import yaml
from kubernetes_asyncio.client import ApiClient

from services.kubectl_runs import completion, render
from services.kubectl_runs.config import default_namespace
from shared.api import API_VERSION, ApiValidationError, parse_object
from shared.cli import views
from shared.kube.client import APPLY_PATCH, KubeError, make_client, request
from shared.kube.informer import EventType, Informer
from shared.kube.resources import (
    BUDGETS,
    GPU_LEASES,
    NODES,
    PODS,
    RESERVATIONS,
    RUNS,
    Resource,
)

FIELD_MANAGER = "kubectl-runs"
MERGE_PATCH = "application/merge-patch+json"
KINDS: Mapping[str, Resource] = {r.kind: r for r in (BUDGETS, RUNS, RESERVATIONS, GPU_LEASES)}
PAGE = 500
RETRIES = 3
Handler = Callable[["Context", argparse.Namespace], Awaitable[int]]


class CliError(Exception):
    """A failure reported as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- the parser


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like the rest of the CLI's errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """kubectl's connection and output flags, accepted before or after the subcommand."""
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("kubectl options")
    group.add_argument("--kubeconfig", metavar="FILE", default=default, help="kubeconfig file")
    group.add_argument("--context", default=default, help="kubeconfig context to use")
    group.add_argument(
        "-n", "--namespace", default=default, help="namespace (default: the context's)"
    )
    group.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="find the Run in any namespace (RUN may also be NAMESPACE/NAME)",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=render.FORMATS,
        default="table" if top else argparse.SUPPRESS,
        help="output format",
    )


def _command(
    subs: argparse._SubParsersAction[Parser],
    name: str,
    help_text: str,
    handler: Handler | None,
) -> Parser:
    parser = subs.add_parser(name, help=help_text, description=help_text)
    _globals(parser, top=False)
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def _run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar=completion.RUN_METAVAR, help="Run name or NAMESPACE/NAME")


def build_parser() -> Parser:
    """The whole command tree (completions are generated from it)."""
    parser = Parser(
        prog="kubectl runs",
        description="Plan, watch and explain Jobtree Runs, budgets and leases.",
    )
    _globals(parser, top=True)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(subs, "submit", "validate manifests and server-side apply them", cmd_submit)
    p.add_argument(
        "-f",
        "--filename",
        metavar=completion.FILE_METAVAR,
        action="append",
        required=True,
        help="YAML or JSON file with one or more documents; - reads stdin (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate on the server, change nothing")
    p.add_argument(
        "--force-conflicts",
        action="store_true",
        help="take over fields another manager owns (server-side apply force)",
    )

    p = _command(subs, "plan", "why a Run waits: phase, reason, forecast, ETA", cmd_plan)
    _run_arg(p)

    p = _command(subs, "watch", "stream width, funding, countdown and lease events", cmd_watch)
    _run_arg(p)
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop after this many seconds (exit 0)"
    )

    p = _command(subs, "explain", "who pays, where, every lease, lotteries replayed", cmd_explain)
    _run_arg(p)

    budgets = _command(subs, "budgets", "budget views", None)
    budget_subs = budgets.add_subparsers(dest="budgets_command", metavar="COMMAND", required=True)
    p = _command(budget_subs, "usage", "headroom per envelope and aggregate cap", cmd_usage)
    p.add_argument("--owner", help="owner, with those below it in the budget tree, or a glob")
    p.add_argument(
        "--spare-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="fraction of a spare GPU-hour charged, as the services are configured (default 1)",
    )

    sponsors = _command(subs, "sponsors", "list or edit spec.funding.sponsors", None)
    sponsor_subs = sponsors.add_subparsers(
        dest="sponsors_command", metavar="COMMAND", required=True
    )
    p = _command(sponsor_subs, "list", "the Run's sponsors and what they pay", cmd_sponsors_list)
    _run_arg(p)
    for action in ("add", "remove"):
        p = _command(sponsor_subs, action, f"{action} a sponsor owner", cmd_sponsors_edit)
        _run_arg(p)
        p.add_argument("owner", metavar="OWNER", help="sponsor owner, e.g. org:vision")

    p = _command(subs, "shrink", "lower a malleable Run's desired width", cmd_shrink)
    _run_arg(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--by", type=int, metavar="N", help="shrink by N GPUs")
    how.add_argument("--to", type=int, metavar="N", help="shrink to N GPUs")

    p = _command(subs, "leases", "the Run's leases, open and closed", cmd_leases)
    _run_arg(p)

    p = _command(subs, "pods", "the Run's pods", cmd_pods)
    _run_arg(p)

    p = _command(subs, "completions", "print a shell completion script", cmd_completions)
    p.add_argument("shell", choices=completion.SHELLS, help="shell")
    return parser


# ---------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every handler shares: the connection, namespace, output and the clock."""

    kubeconfig: str | None
    context: str | None
    namespace: str
    explicit_namespace: bool
    all_namespaces: bool
    output: str
    width: int
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _api: ApiClient | None = None

    async def api(self) -> ApiClient:
        if self._api is None:
            if self.kubeconfig and not Path(self.kubeconfig).expanduser().is_file():
                raise CliError(f"kubeconfig {self.kubeconfig} does not exist")
            try:
                self._api = await make_client(self.kubeconfig, self.context)
            except Exception as exc:
                raise CliError(f"cannot load kubeconfig: {exc}") from exc
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def emit(self, record: Any, table: Callable[[], str]) -> None:
        """Print ``record`` in the chosen format (``table`` renders it for people)."""
        text = table() if self.output == "table" else render.dump(record, self.output)
        print(text, file=self.out, flush=True)

    def note(self, message: str) -> None:
        print(message, file=self.err, flush=True)


def make_context(args: argparse.Namespace, environ: Mapping[str, str]) -> Context:
    explicit = getattr(args, "namespace", None)
    namespace = explicit or default_namespace(args.kubeconfig, args.context, environ)
    columns = shutil.get_terminal_size((120, 24)).columns
    return Context(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=namespace,
        explicit_namespace=bool(explicit),
        all_namespaces=bool(args.all_namespaces),
        output=args.output,
        width=max(80, columns),
    )


# ---------------------------------------------------------------------------- API helpers


def explain_error(exc: KubeError, what: str) -> str:
    """One line for a failed API call about ``what``."""
    if exc.status == 0:
        return f"cannot reach the API server: {exc.message}"
    if exc.status == 404 and "could not find the requested resource" in exc.message:
        return f"{what}: the server does not serve it (are the Jobtree CRDs installed?)"
    if exc.status == 404:
        return f"{what} not found"
    if exc.status in (401, 403):
        return f"{what}: {exc.reason or 'Forbidden'}: {exc.message}"
    return f"{what}: {exc.reason or exc.status}: {exc.message}".rstrip(": ")


async def list_objects(
    api: ApiClient,
    resource: Resource,
    *,
    namespace: str | None = None,
    label_selector: str | None = None,
    field_selector: str | None = None,
) -> list[dict[str, Any]]:
    """Every object of a (paged) list."""
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        query: list[tuple[str, str | int]] = [("limit", PAGE)]
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        if token:
            query.append(("continue", token))
        page = await request(api, "GET", resource.path(namespace), query=query)
        items += [i for i in page.get("items") or () if isinstance(i, dict)]
        token = (page.get("metadata") or {}).get("continue") or None
        if token is None:
            return items


async def _list(ctx: Context, resource: Resource, what: str, **kwargs: Any) -> list[dict[str, Any]]:
    try:
        return await list_objects(await ctx.api(), resource, **kwargs)
    except KubeError as exc:
        raise CliError(explain_error(exc, what)) from exc


async def _list_optional(ctx: Context, resource: Resource, **kwargs: Any) -> list[dict[str, Any]]:
    """A list a view can do without (forbidden or absent → empty)."""
    try:
        return await list_objects(await ctx.api(), resource, **kwargs)
    except KubeError as exc:
        if exc.status in (401, 403, 404):
            return []
        raise CliError(explain_error(exc, resource.plural)) from exc


async def get_object(
    ctx: Context, resource: Resource, name: str, namespace: str | None
) -> dict[str, Any] | None:
    try:
        return await request(await ctx.api(), "GET", resource.path(namespace, name))
    except KubeError as exc:
        if exc.status == 404 and "could not find the requested resource" not in exc.message:
            return None
        what = f'{resource.kind.lower()} "{name}"'
        raise CliError(explain_error(exc, what)) from exc


def run_ref(ctx: Context, text: str) -> tuple[str | None, str]:
    """(namespace or None for "any namespace", name) of a RUN argument."""
    try:
        if "/" in text:
            return views.split_run_ref(text, ctx.namespace)
    except views.ViewError as exc:
        raise CliError(str(exc)) from exc
    return (None if ctx.all_namespaces else ctx.namespace), text


async def find_run(ctx: Context, text: str) -> dict[str, Any]:
    """The Run named by a RUN argument; CliError when it is missing or ambiguous."""
    namespace, name = run_ref(ctx, text)
    if namespace is not None:
        run = await get_object(ctx, RUNS, name, namespace)
        if run is None:
            raise CliError(f'run "{name}" not found in namespace "{namespace}"')
        return run
    found = await _list(ctx, RUNS, "runs", field_selector=f"metadata.name={name}")
    if not found:
        raise CliError(f'run "{name}" not found in any namespace')
    if len(found) > 1:
        spaces = ", ".join(sorted(views.namespace_of(r) or "?" for r in found))
        raise CliError(f'run "{name}" exists in several namespaces ({spaces}): use NAMESPACE/NAME')
    return found[0]


# ---------------------------------------------------------------------------- submit


def read_documents(paths: Sequence[str], stdin: TextIO) -> list[tuple[str, int, Any]]:
    """(source, document number, document) of every non-empty document; ``List`` unwrapped."""
    out: list[tuple[str, int, Any]] = []
    for path in paths:
        source = "stdin" if path == "-" else path
        try:
            text = stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise CliError(f"{source}: cannot read: {exc.strerror or exc}") from exc
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise CliError(f"{source}: not YAML or JSON: {' '.join(str(exc).split())}") from exc
        number = 0
        for doc in docs:
            items = (
                doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else None
            )
            for item in items if isinstance(items, list) else [doc]:
                number += 1
                out.append((source, number, item))
    if not out:
        raise CliError("no objects to submit: the input is empty")
    return out


def _describe(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "not an object"
    name = (
        (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    )
    return f"{doc.get('kind') or '?'} {name or '?'}"


async def cmd_submit(ctx: Context, args: argparse.Namespace) -> int:
    """Validate every document with the API models, then server-side apply each."""
    docs = read_documents(args.filename, sys.stdin)
    problems = []
    for source, number, doc in docs:
        try:
            if not isinstance(doc, dict):
                raise ApiValidationError(["document is not an object"])
            parse_object(doc)
        except ApiValidationError as exc:
            problems.append(
                f"{source}: document {number} ({_describe(doc)}): " + "; ".join(exc.issues)
            )
    if problems:
        for line in problems[:-1]:
            ctx.note(f"error: {line}")
        raise CliError(problems[-1])
    results = []
    api = await ctx.api()
    for _, _, doc in docs:
        results.append(await _apply_one(ctx, api, doc, args))
    ctx.emit(results, lambda: render.submitted(results))
    return 0


async def _apply_one(
    ctx: Context, api: ApiClient, doc: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    resource = KINDS[doc["kind"]]
    body = {**doc, "metadata": dict(doc.get("metadata") or {})}
    name = body["metadata"]["name"]
    namespace: str | None = None
    if resource.namespaced:
        given = body["metadata"].get("namespace")
        if given and ctx.explicit_namespace and given != ctx.namespace:
            raise CliError(
                f'{doc["kind"]} {name}: its namespace "{given}" does not match -n "{ctx.namespace}"'
            )
        namespace = given or ctx.namespace
        body["metadata"]["namespace"] = namespace
    else:
        body["metadata"].pop("namespace", None)
    label = f"{resource.plural}.{resource.group}/{name}"
    try:
        before = await request(api, "GET", resource.path(namespace, name))
    except KubeError as exc:
        if exc.status != 404 or "could not find the requested resource" in exc.message:
            raise CliError(explain_error(exc, label)) from exc
        before = None
    query: list[tuple[str, str | int]] = [("fieldManager", FIELD_MANAGER)]
    if args.force_conflicts:
        query.append(("force", "true"))
    if args.dry_run:
        query.append(("dryRun", "All"))
    try:
        after = await request(
            api,
            "PATCH",
            resource.path(namespace, name),
            query=query,
            body=body,
            content_type=APPLY_PATCH,
        )
    except KubeError as exc:
        message = explain_error(exc, label)
        if exc.status == 404:
            message = f"{label}: {exc.message}"
        if exc.status == 409:
            message += " (another manager owns these fields: --force-conflicts takes them over)"
        raise CliError(message) from exc
    if before is None:
        result = "created"
    else:
        old_version = (before.get("metadata") or {}).get("resourceVersion")
        same = old_version == (after.get("metadata") or {}).get("resourceVersion")
        result = "unchanged" if same else "configured"
    if args.dry_run:
        result += " (server dry run)"
    return {
        "resource": f"{resource.plural}.{resource.group}",
        "kind": doc["kind"],
        "name": name,
        "namespace": namespace,
        "result": result,
    }


# ---------------------------------------------------------------------------- plan, explain


async def cmd_plan(ctx: Context, args: argparse.Namespace) -> int:
    run = await find_run(ctx, args.run)
    namespace = views.namespace_of(run)
    reservations = await _list_optional(ctx, RESERVATIONS, namespace=namespace)
    record = views.plan_record(run, views.pick_reservation(run, reservations), ctx.now())
    ctx.emit(record, lambda: render.plan(record, ctx.width))
    return 0


async def cmd_explain(ctx: Context, args: argparse.Namespace) -> int:
    namespace, name = run_ref(ctx, args.run)
    try:
        run: dict[str, Any] | None = await find_run(ctx, args.run)
    except CliError:
        if namespace is None:
            raise
        run = None
    key = views.run_key_of(run) if run is not None else (namespace or "", name)
    leases = await _list(
        ctx, GPU_LEASES, "leases.rq.davidlangworthy.io", label_selector=views.lease_selector(key)
    )
    if run is None:
        if not views.leases_of(key, leases):
            raise CliError(f'run "{name}" not found in namespace "{namespace}"')
        ctx.note(f"note: run {key[0]}/{key[1]} no longer exists; explaining it from its leases")
        run = {"apiVersion": API_VERSION, "kind": "Run", "metadata": {"name": key[1]}}
        run["metadata"]["namespace"] = key[0]
    reservations = await _list_optional(ctx, RESERVATIONS)
    if not reservations:
        reservations = await _list_optional(ctx, RESERVATIONS, namespace=key[0])
    nodes = await _list_optional(ctx, NODES)
    record = views.explain_record(run, leases, reservations, nodes, ctx.now())
    ctx.emit(record, lambda: render.explain(record, ctx.width))
    return 0


# ---------------------------------------------------------------------------- budgets


async def cmd_usage(ctx: Context, args: argparse.Namespace) -> int:
    budgets = await _list(ctx, BUDGETS, "budgets.rq.davidlangworthy.io")
    leases = await _list(ctx, GPU_LEASES, "leases.rq.davidlangworthy.io")
    if not 0 <= args.spare_factor <= 1:
        raise CliError(f"--spare-factor must be within [0, 1], not {args.spare_factor:g}")
    record = views.usage_record(
        budgets, leases, ctx.now(), owner=args.owner, spare_factor=args.spare_factor
    )
    if args.owner and not record["envelopes"] and not record["aggregateCaps"]:
        owners = sorted({str((b.get("spec") or {}).get("owner")) for b in budgets})
        raise CliError(
            f"no budget owner matches {args.owner!r} (owners: {', '.join(owners) or 'none'}; "
            "an owner matches those below it in the tree of Budgets, not by path prefix: "
            "select by path with a glob such as 'org:ai:*')"
        )
    ctx.emit(record, lambda: render.usage(record, ctx.width))
    return 0


# ---------------------------------------------------------------------------- edits


async def _patch_run(
    ctx: Context,
    args: argparse.Namespace,
    edit_of: Callable[[dict[str, Any]], views.Edit],
) -> tuple[dict[str, Any], views.Edit]:
    """Read, compute the edit, merge-patch with the resourceVersion; retry on a conflict."""
    for attempt in range(RETRIES):
        run = await find_run(ctx, args.run)
        try:
            edit = edit_of(run)
        except views.ViewError as exc:
            raise CliError(str(exc)) from exc
        if edit.patch is None:
            return run, edit
        namespace, name = views.run_key_of(run)
        try:
            patched = await request(
                await ctx.api(),
                "PATCH",
                RUNS.path(namespace, name),
                body=edit.patch,
                content_type=MERGE_PATCH,
            )
        except KubeError as exc:
            if exc.status == 409 and attempt + 1 < RETRIES:
                continue
            raise CliError(explain_error(exc, f'run "{name}"')) from exc
        return patched, edit
    raise CliError("the Run kept changing while it was patched: try again")


async def cmd_sponsors_list(ctx: Context, args: argparse.Namespace) -> int:
    run = await find_run(ctx, args.run)
    record = views.sponsors_record(run)

    def table() -> str:
        head = render.fields(
            [
                ("Run", record["run"]),
                ("Allow borrow", record["allowBorrow"]),
                ("Max borrow GPUs", record["maxBorrowGPUs"] or "unbounded"),
            ],
            width=ctx.width,
        )
        if not record["sponsors"]:
            return head + "\n\nNo sponsors."
        rows = [
            [s["owner"], s["kind"], s["gpus"], f"{s['gpuHours']:.2f}"] for s in record["sponsors"]
        ]
        return (
            head
            + "\n\n"
            + render.table(["SPONSOR", "PAYING AS", "GPUS NOW", "GPU-HOURS"], rows, width=ctx.width)
        )

    ctx.emit(record, table)
    return 0


async def cmd_sponsors_edit(ctx: Context, args: argparse.Namespace) -> int:
    action = args.sponsors_command
    run, edit = await _patch_run(ctx, args, lambda r: views.sponsors_edit(r, action, args.owner))
    for note in edit.notes:
        ctx.note(note)
    record = {
        "run": views.run_label(views.run_key_of(run)),
        "sponsors": views.sponsors_of(run),
        "changed": edit.patch is not None,
        "message": edit.message,
    }
    ctx.emit(record, lambda: edit.message)
    return 0


async def cmd_shrink(ctx: Context, args: argparse.Namespace) -> int:
    run, edit = await _patch_run(ctx, args, lambda r: views.shrink_edit(r, by=args.by, to=args.to))
    record = {
        "run": views.run_label(views.run_key_of(run)),
        "desiredTotalGPUs": views.desired_width(run),
        "changed": edit.patch is not None,
        "message": edit.message,
    }
    ctx.emit(record, lambda: edit.message)
    return 0


# ---------------------------------------------------------------------------- leases, pods


async def cmd_leases(ctx: Context, args: argparse.Namespace) -> int:
    """Leases outlive their Run: selected by label, so this works after the Run is gone."""
    namespace, name = run_ref(ctx, args.run)
    selector = views.lease_selector((namespace or "", name))
    if namespace is None:
        selector = selector.split(",")[0]
    leases = await _list(ctx, GPU_LEASES, "leases.rq.davidlangworthy.io", label_selector=selector)
    leases = [
        lease
        for lease in leases
        if views.lease_run_key(lease)[1] == name
        and (namespace is None or views.lease_run_key(lease)[0] == namespace)
    ]
    rows = views.lease_rows(leases, ctx.now())
    ctx.emit(rows, lambda: render.leases(rows, ctx.width))
    return 0


async def cmd_pods(ctx: Context, args: argparse.Namespace) -> int:
    namespace, name = run_ref(ctx, args.run)
    pods = await _list(
        ctx, PODS, "pods", namespace=namespace, label_selector=views.pod_selector(("", name))
    )
    rows = views.pod_rows(pods, ctx.now())
    ctx.emit(rows, lambda: render.pods(rows, ctx.width))
    return 0


# ---------------------------------------------------------------------------- watch


async def cmd_watch(ctx: Context, args: argparse.Namespace) -> int:
    """Stream changes of the Run, its Reservation and its Leases until a terminal phase."""
    run = await find_run(ctx, args.run)
    key = views.run_key_of(run)
    namespace, name = key
    api = await ctx.api()
    informers = {
        "run": Informer(api, RUNS, namespace=namespace, field_selector=f"metadata.name={name}"),
        "reservation": Informer(api, RESERVATIONS, namespace=namespace),
        "lease": Informer(api, GPU_LEASES, label_selector=views.lease_selector(key)),
    }
    queue: asyncio.Queue[tuple[str, EventType, dict[str, Any], dict[str, Any] | None]]
    queue = asyncio.Queue()

    def listener(kind: str, informer: Informer) -> Callable[..., None]:
        def on_change(event: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            if informer.ready.is_set():  # the first list is shown as a snapshot instead
                queue.put_nowait((kind, event, obj, old))

        return on_change

    for kind, informer in informers.items():
        informer.add_listener(listener(kind, informer))
    tasks = [asyncio.create_task(i.run()) for i in informers.values()]
    loop = asyncio.get_running_loop()
    deadline = None if args.timeout is None else loop.time() + max(0.0, args.timeout)
    try:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(i.ready.wait() for i in informers.values())), timeout=30
            )
        except TimeoutError as exc:
            raise CliError("could not list the Run, its Reservations and Leases in 30s") from exc
        current = informers["run"].get(f"{namespace}/{name}") or run
        snapshot = views.watch_snapshot(
            current,
            informers["reservation"].items.values(),
            informers["lease"].items.values(),
            ctx.now(),
        )
        for record in snapshot:
            _print_event(ctx, record)
        if views.is_terminal(current):
            return 0
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                ctx.note(f"watch: stopped after {args.timeout:g}s (timeout)")
                return 0
            try:
                kind, event, obj, old = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                continue
            deleted = event == "DELETED"
            now = ctx.now()
            if kind == "run":
                records = views.run_events(obj, None if deleted else old, now, deleted=deleted)
            elif kind == "reservation":
                if views.reservation_run_key(obj) != key:
                    continue
                records = views.reservation_events(obj, old, now, deleted=deleted)
            else:
                if views.lease_run_key(obj) != key:
                    continue
                records = views.lease_events(obj, old, now, deleted=deleted)
            for record in records:
                _print_event(ctx, record)
            if kind == "run" and (deleted or views.is_terminal(obj)):
                return 0
    finally:
        for informer in informers.values():
            informer.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def _print_event(ctx: Context, record: Mapping[str, Any]) -> None:
    if ctx.output == "json":
        text = json.dumps(record, ensure_ascii=False)
    elif ctx.output == "yaml":
        text = "---\n" + render.dump(dict(record), "yaml")
    else:
        text = render.event(record)
    print(text, file=ctx.out, flush=True)


# ---------------------------------------------------------------------------- completions


async def cmd_completions(ctx: Context, args: argparse.Namespace) -> int:
    tree = completion.command_tree(build_parser())
    print(completion.script(args.shell, tree), end="", file=ctx.out)
    return 0


# ---------------------------------------------------------------------------- entry


def complete_protocol(args: Sequence[str], out: TextIO) -> int:
    """kubectl's plugin completion protocol: candidates, then ``:<directive>``."""
    tree = completion.command_tree(build_parser())
    candidates, directive = completion.complete(tree, list(args) or [""])
    for candidate in candidates:
        print(candidate, file=out)
    print(f":{directive}", file=out)
    return 0


async def dispatch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    handler: Handler = args.handler
    offline = handler is cmd_completions
    ctx = make_context_offline(args) if offline else make_context(args, environ)
    try:
        return await handler(ctx, args)
    finally:
        await ctx.close()


def make_context_offline(args: argparse.Namespace) -> Context:
    """Commands that never talk to the cluster need no kubeconfig."""
    return Context(
        kubeconfig=None,
        context=None,
        namespace="default",
        explicit_namespace=False,
        all_namespaces=False,
        output=args.output,
        width=120,
    )


def run(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """Parse ``argv`` and run the command; the process exit status."""
    if argv and argv[0] == "__complete":
        return complete_protocol(argv[1:], sys.stdout)
    args = build_parser().parse_args(list(argv))
    try:
        return asyncio.run(dispatch(args, os.environ if environ is None else environ))
    except CliError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0 if args.command == "watch" else 130
    except BrokenPipeError:
        return 0
