"""The thin shell around each ``kubectl runs`` command (the tree itself is in ``cli``).

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
import logging
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from kubernetes_asyncio.client import ApiClient

from services.kubectl_runs import completion, output, render, whatif
from services.kubectl_runs.cli import build_parser, handler_of
from services.kubectl_runs.config import ConfigError, client_kubeconfig, default_namespace
from shared.api import API_VERSION, ApiValidationError, parse_object
from shared.cli import views
from shared.cli.documents import MAX_INPUT_BYTES, DocumentError, parse_documents
from shared.cli.expected import with_expected
from shared.control.whatif import what_if
from shared.kube.cache import HOLDING_PODS
from shared.kube.client import APPLY_PATCH, DEFAULT_TIMEOUT, KubeError, make_client, request
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
from shared.kube.translate import TranslateError, run_request

FIELD_MANAGER = "kubectl-runs"
MERGE_PATCH = "application/merge-patch+json"
KINDS: Mapping[str, Resource] = {r.kind: r for r in (BUDGETS, RUNS, RESERVATIONS, GPU_LEASES)}
PAGE = 500
RETRIES = 3
EXIT_WATCH_FAILED = 3
EXIT_WATCH_DELETED = 4
EXIT_WATCH_TIMEOUT = 5
"""``watch`` exit codes (documented in ``cli.EXIT_CODES`` and docs/kubectl-runs.md)."""
UNLIMITED = 1 << 30
"""Table width when stdout is not a terminal: nothing is cut."""
Handler = Callable[["Context", argparse.Namespace], Awaitable[int]]


class CliError(Exception):
    """A failure reported as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


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
    """The ``-o`` kind: table, wide, json, yaml, name, jsonpath or custom-columns."""
    width: int
    """Columns a table may use; unlimited (no ``…``) when stdout is not a terminal."""
    template: str = ""
    no_headers: bool = False
    timeout: float = DEFAULT_TIMEOUT
    """Seconds each API request may take (``--request-timeout``)."""
    environ: Mapping[str, str] = field(default_factory=dict)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _api: ApiClient | None = None

    async def api(self) -> ApiClient:
        if self._api is None:
            try:
                path = client_kubeconfig(self.kubeconfig, self.environ)
            except ConfigError as exc:
                raise CliError(str(exc)) from exc
            try:
                self._api = await make_client(path, self.context, in_cluster=path is None)
            except Exception as exc:
                raise CliError(f"cannot load kubeconfig {path or '(in-cluster)'}: {exc}") from exc
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def emit(
        self,
        record: Any,
        table: Callable[[], str],
        *,
        wide: Callable[[], str] | None = None,
        names: Callable[[], list[str]] | None = None,
        headed: bool = False,
    ) -> None:
        """Print ``record`` in the chosen format.

        ``table`` (and ``wide``, else ``table``) render it for people; ``headed`` says their
        first line is a column header (``--no-headers`` drops it); ``names`` gives the
        ``resource/name`` lines of ``-o name`` (default: ``runs…/<run>`` of the record).
        """
        if self.output in ("table", "wide"):
            text = (wide or table)() if self.output == "wide" else table()
            if headed and self.no_headers:
                text = "\n".join(text.splitlines()[1:])
        elif self.output == "name":
            text = "\n".join(names() if names is not None else default_names(record))
        elif self.output == "jsonpath":
            text = self._checked(lambda: output.jsonpath(self.template, record))
        elif self.output == "custom-columns":
            rows = record if isinstance(record, list) else [record]
            headers, body = self._checked(lambda: output.custom_columns(self.template, rows))
            text = render.table(headers, body, width=self.width)
            if self.no_headers:
                text = "\n".join(text.splitlines()[1:])
        else:
            text = render.dump(record, self.output)
        if text:  # kubectl ends a JSONPath result with no newline of its own
            end = "" if self.output == "jsonpath" else "\n"
            print(text, file=self.out, end=end, flush=True)

    @staticmethod
    def _checked(make: Callable[[], Any]) -> Any:
        try:
            return make()
        except output.OutputError as exc:
            raise CliError(f"-o: {exc}") from exc

    def note(self, message: str) -> None:
        print(message, file=self.err, flush=True)


def default_names(record: Any) -> list[str]:
    """``-o name`` of a record that names Runs (``run``) or of rows with ``name``."""
    rows = record if isinstance(record, list) else [record]
    out = []
    for row in rows:
        if isinstance(row, Mapping) and (row.get("run") or row.get("name")):
            name = str(row.get("run") or row.get("name")).rpartition("/")[2]
            out.append(f"{row.get('resource') or 'runs.rq.davidlangworthy.io'}/{name}")
    return out


def request_timeout(text: str) -> float:
    """``--request-timeout``: ``0`` (the default limit), seconds, or ``1s``/``2m``/``1h``."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip()
    scale = units.get(raw[-1:], 1) if raw else 1
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        value = float(number) * scale
    except ValueError:
        value = -1
    if value < 0:
        raise CliError(f"--request-timeout {text!r}: a duration like 30s, 2m or 1h (0: default)")
    return value or DEFAULT_TIMEOUT


def table_width(environ: Mapping[str, str], terminal: bool) -> int:
    """The terminal's width (at least 80); unlimited when stdout is not a terminal, like
    kubectl, unless ``COLUMNS`` asks for a width."""
    asked = environ.get("COLUMNS", "")
    if asked.isdigit() and int(asked) > 0:
        return max(80, int(asked))
    if not terminal:
        return UNLIMITED
    return max(80, shutil.get_terminal_size((120, 24)).columns)


def make_context(args: argparse.Namespace, environ: Mapping[str, str]) -> Context:
    explicit = getattr(args, "namespace", None)
    namespace = explicit or default_namespace(args.kubeconfig, args.context, environ)
    try:
        chosen = output.Output.parse(args.output)
    except output.OutputError as exc:
        raise CliError(str(exc)) from exc
    return Context(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=namespace,
        explicit_namespace=bool(explicit),
        all_namespaces=bool(args.all_namespaces),
        output=chosen.kind,
        template=chosen.template,
        no_headers=bool(args.no_headers),
        timeout=request_timeout(args.request_timeout),
        width=table_width(environ, sys.stdout.isatty()),
        environ=environ,
    )


# ---------------------------------------------------------------------------- API helpers


def explain_error(exc: KubeError, what: str) -> str:
    """One line for a failed API call about ``what``."""
    if exc.status == 0:
        return unreachable(exc)
    if exc.status == 404 and "could not find the requested resource" in exc.message:
        return f"{what}: the server does not serve it (are the Jobtree CRDs installed?)"
    if exc.status == 404:
        return f"{what} not found"
    if exc.status in (401, 403):
        return f"{what}: {exc.reason or 'Forbidden'}: {exc.message}"
    return f"{what}: {exc.reason or exc.status}: {exc.message}".rstrip(": ")


def unreachable(exc: KubeError) -> str:
    """kubectl's words for a server that was not reached (not the client library's repr)."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError):
        where = f"{cause.host}:{cause.port}"
        if isinstance(cause.os_error, ConnectionRefusedError):
            return (
                f"The connection to the server {where} was refused - "
                "did you specify the right host or port?"
            )
        reason = cause.os_error.strerror or type(cause.os_error).__name__
        return f"Unable to connect to the server {where}: {reason}"
    if isinstance(cause, TimeoutError | aiohttp.ServerTimeoutError):
        return "Unable to connect to the server: the request timed out (see --request-timeout)"
    if cause is not None:
        return f"Unable to connect to the server: {type(cause).__name__}: {cause}"
    return f"Unable to connect to the server: {exc.message}"


async def _get_retrying(
    api: ApiClient, path: str, query: list[tuple[str, str | int]], timeout: float
) -> dict[str, Any]:
    """A GET that waits out 429 Too Many Requests (a CRD just established, a busy server) a
    few times, as kubectl's client does."""
    attempt = 0
    while True:
        try:
            return await request(api, "GET", path, query=query, timeout=timeout)
        except KubeError as exc:
            attempt += 1
            if exc.status != 429 or attempt >= RETRIES:
                raise
            await asyncio.sleep(attempt)


async def list_objects(
    api: ApiClient,
    resource: Resource,
    *,
    namespace: str | None = None,
    label_selector: str | None = None,
    field_selector: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
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
        page = await _get_retrying(api, resource.path(namespace), query, timeout)
        items += [i for i in page.get("items") or () if isinstance(i, dict)]
        token = (page.get("metadata") or {}).get("continue") or None
        if token is None:
            return items


async def _list(ctx: Context, resource: Resource, what: str, **kwargs: Any) -> list[dict[str, Any]]:
    try:
        return await list_objects(await ctx.api(), resource, timeout=ctx.timeout, **kwargs)
    except KubeError as exc:
        raise CliError(explain_error(exc, what)) from exc


async def _list_optional(ctx: Context, resource: Resource, **kwargs: Any) -> list[dict[str, Any]]:
    """A list a view can do without (forbidden or absent → empty)."""
    try:
        return await list_objects(await ctx.api(), resource, timeout=ctx.timeout, **kwargs)
    except KubeError as exc:
        if exc.status in (401, 403, 404):
            return []
        raise CliError(explain_error(exc, resource.plural)) from exc


async def get_object(
    ctx: Context, resource: Resource, name: str, namespace: str | None
) -> dict[str, Any] | None:
    try:
        path = resource.path(namespace, name)
        return await request(await ctx.api(), "GET", path, timeout=ctx.timeout)
    except KubeError as exc:
        if exc.status == 404 and "could not find the requested resource" not in exc.message:
            return None
        what = f'{resource.kind.lower()} "{name}"'
        raise CliError(explain_error(exc, what)) from exc


def run_ref(ctx: Context, text: str) -> tuple[str | None, str]:
    """(namespace or None for "any namespace", name) of a RUN argument.

    ``-o name``'s ``runs.rq.davidlangworthy.io/NAME`` is accepted too (namespaces have no dots).
    """
    text = text.removeprefix(f"{RUNS.plural}.{RUNS.group}/")
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


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def manifest_paths(paths: Sequence[str], recursive: bool) -> list[str]:
    """``-f`` arguments with each directory replaced by its ``.yaml``/``.yml``/``.json`` files
    (sorted; ``-R`` also those of its subdirectories), like kubectl's ``-f DIR``."""
    out: list[str] = []
    for path in paths:
        folder = Path(path)
        if path == "-" or not folder.is_dir():
            out.append(path)
            continue
        found = folder.rglob("*") if recursive else folder.glob("*")
        files = sorted(str(f) for f in found if f.is_file() and f.suffix in MANIFEST_SUFFIXES)
        if not files:
            more = "" if recursive else " (-R looks in its subdirectories)"
            raise CliError(f"{path}: no .yaml, .yml or .json files in the directory{more}")
        out += files
    return out


def read_documents(paths: Sequence[str], stdin: TextIO) -> list[tuple[str, int, Any]]:
    """(source, document number, document) of every non-empty document; ``List`` unwrapped."""
    out: list[tuple[str, int, Any]] = []
    for path in paths:
        source = "stdin" if path == "-" else path
        try:
            if path == "-":
                text = stdin.read(MAX_INPUT_BYTES + 1)
            else:
                with Path(path).open(encoding="utf-8") as handle:
                    text = handle.read(MAX_INPUT_BYTES + 1)
        except OSError as exc:
            raise CliError(f"{source}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise CliError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        try:
            docs = parse_documents(text)
        except DocumentError as exc:
            raise CliError(f"{source}: {exc}") from exc
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
    docs = read_documents(manifest_paths(args.filename, args.recursive), sys.stdin)
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
    if args.dry_run == "client":
        results = [_client_dry_run(ctx, doc) for _, _, doc in docs]
        ctx.emit(results, lambda: render.submitted(results), names=lambda: _names(results))
        return 0
    api = await ctx.api()
    for _, _, doc in docs:
        results.append(await _apply_one(ctx, api, doc, args))
    ctx.emit(results, lambda: render.submitted(results), names=lambda: _names(results))
    return 0


def _names(results: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"{r['resource']}/{r['name']}" for r in results]


def _client_dry_run(ctx: Context, doc: dict[str, Any]) -> dict[str, Any]:
    """``--dry-run=client``: validated by the API models only; the server is not contacted."""
    resource = KINDS[doc["kind"]]
    metadata = doc.get("metadata") or {}
    namespace = (metadata.get("namespace") or ctx.namespace) if resource.namespaced else None
    return {
        "resource": f"{resource.plural}.{resource.group}",
        "kind": doc["kind"],
        "name": metadata.get("name"),
        "namespace": namespace,
        "result": "valid (client dry run: not sent to the server)",
    }


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
        before = await request(api, "GET", resource.path(namespace, name), timeout=ctx.timeout)
    except KubeError as exc:
        if exc.status != 404 or "could not find the requested resource" in exc.message:
            raise CliError(explain_error(exc, label)) from exc
        before = None
    query: list[tuple[str, str | int]] = [("fieldManager", FIELD_MANAGER)]
    if args.force_conflicts:
        query.append(("force", "true"))
    if args.dry_run == "server":
        query.append(("dryRun", "All"))
    try:
        after = await request(
            api,
            "PATCH",
            resource.path(namespace, name),
            query=query,
            body=body,
            content_type=APPLY_PATCH,
            timeout=ctx.timeout,
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
    if args.dry_run == "server":
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
    if args.filename:
        return await _plan_file(ctx, args.filename)
    if not args.run:
        raise CliError("plan needs a Run name, or -f FILE for a Run not yet submitted", 2)
    run = await find_run(ctx, args.run)
    namespace = views.namespace_of(run)
    reservations = await _list_optional(ctx, RESERVATIONS, namespace=namespace)
    reservation = views.pick_reservation(run, reservations)
    nodes = await _list_optional(ctx, NODES)
    pods = await _list_optional(ctx, PODS, field_selector=HOLDING_PODS) if nodes else []
    excluded = views.excluded_record(run, nodes, pods)
    record = with_expected(
        views.plan_record(run, reservation, ctx.now(), excluded), reservation, ctx.now()
    )
    ctx.emit(record, lambda: render.plan(record, ctx.width))
    return 0


async def _plan_file(ctx: Context, path: str) -> int:
    """``plan -f``: the what-if of a Run manifest against what the cluster holds, read-only."""
    source, _, doc = read_documents([path], sys.stdin)[0]
    try:
        request = run_request(whatif.hypothetical_run(doc, ctx.namespace))
    except (ValueError, TranslateError) as exc:
        raise CliError(f"{source}: {exc}") from exc
    objects = {
        "nodes": await _list(ctx, NODES, "nodes"),
        "budgets": await _list(ctx, BUDGETS, "budgets"),
        "leases": await _list_optional(ctx, GPU_LEASES),
        "runs": await _list_optional(ctx, RUNS),
        "reservations": await _list_optional(ctx, RESERVATIONS),
    }
    record = what_if(request, whatif.snapshot(ctx.now(), objects))
    ctx.emit(record, lambda: whatif.render(record))
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
                timeout=ctx.timeout,
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
    names = [f"leases.rq.davidlangworthy.io/{r['name']}" for r in rows]
    ctx.emit(rows, lambda: render.leases(rows, ctx.width), names=lambda: names, headed=bool(rows))
    return 0


async def cmd_pods(ctx: Context, args: argparse.Namespace) -> int:
    namespace, name = run_ref(ctx, args.run)
    pods = await _list(
        ctx, PODS, "pods", namespace=namespace, label_selector=views.pod_selector(("", name))
    )
    rows = views.pod_rows(pods, ctx.now())
    names = [f"pod/{r['name']}" for r in rows]
    ctx.emit(rows, lambda: render.pods(rows, ctx.width), names=lambda: names, headed=bool(rows))
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
            return watch_exit(current, deleted=False)
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                ctx.note(f"watch: stopped after {args.timeout:g}s (timeout)")
                return EXIT_WATCH_TIMEOUT
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
                return watch_exit(obj, deleted=deleted)
    finally:
        for informer in informers.values():
            informer.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def watch_exit(run: Mapping[str, Any], *, deleted: bool) -> int:
    """``watch``'s exit status once the Run is done: 0 Completed, 3 Failed, 4 deleted."""
    if deleted:
        return EXIT_WATCH_DELETED
    phase = (run.get("status") or {}).get("phase")
    return EXIT_WATCH_FAILED if phase == "Failed" else 0


def _print_event(ctx: Context, record: Mapping[str, Any]) -> None:
    if ctx.output == "json":
        text = json.dumps(record, ensure_ascii=False)
    elif ctx.output == "yaml":
        text = "---\n" + render.dump(dict(record), "yaml")
    elif ctx.output == "jsonpath":
        text = Context._checked(lambda: output.jsonpath(ctx.template, dict(record)))
    else:
        text = render.event(record)
    print(text, file=ctx.out, flush=True)


# ---------------------------------------------------------------------------- completions


async def cmd_completions(ctx: Context, args: argparse.Namespace) -> int:
    tree = completion.command_tree(build_parser())
    print(completion.script(args.shell, tree), end="", file=ctx.out)
    return 0


# ---------------------------------------------------------------------------- entry


async def dispatch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    handler: Handler = handler_of(args.handler)
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


def execute(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run the parsed command; the process exit status."""
    logging.basicConfig(level=logging.CRITICAL, format="%(message)s")  # libraries stay quiet
    try:
        return asyncio.run(dispatch(args, environ))
    except CliError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0 if args.command == "watch" else 130
    except BrokenPipeError:
        return 0
