"""Traces — one trace per Run decision across every service hop, exported to a real Jaeger
(SPEC §4 Interfaces: OpenTelemetry, context carried in NATS headers, OTLP export to Jaeger).

A real Jaeger v2 all-in-one (built from the Go module proxy by ``hack/testbin.sh jaeger``, run
with its default in-memory configuration: OTLP/HTTP on 4318, query API on 16686) receives the
spans of a small local Jobtree whose five service processes export to it
(``$OTEL_EXPORTER_OTLP_ENDPOINT``). A Budget and an 8-GPU Run are applied; once the Run is
Running, the test reads the Run's trace back through Jaeger's query API and checks that ONE trace
holds the whole decision:

    admission  run.decide (root; the Run's namespace, name, uid)
    admission    jobtree.v1.packer.plan  CLIENT ─▶ packer  SERVER
    admission    jobtree.v1.binder.commit CLIENT ─▶ binder SERVER
    binder         jobtree.v1.events.ledger PRODUCER ─▶ forecast CONSUMER (and admission's)

four services, every hop a child of the one before it across the NATS headers.

This test brings up its own stack (2 nodes per fabric domain) rather than the session ``stack``,
whose services do not export traces.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.local.stack import LocalStack, running_stack
from shared.localenv.processes import tail
from shared.localenv.services import SERVICES

from .conftest import BUDGETS, GROUP, create_namespace, eventually, get_json, run_object

REPO = Path(__file__).resolve().parents[2]
OTLP_HTTP_PORT = 4318
QUERY_PORT = 16686
HOST = "127.0.0.1"

NS = "e2e-tracing"
OWNER = "org:trace:team"
BUDGET = "e2e-tracing"
RUN = "traced-run"
GPUS = 8
NV_A = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"}

PLAN = "jobtree.v1.packer.plan"
COMMIT = "jobtree.v1.binder.commit"
LEDGER = "jobtree.v1.events.ledger"


def _progress(message: str) -> None:
    print(f"e2e tracing: {message}", file=sys.stderr, flush=True)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Jaeger:
    """A running Jaeger all-in-one: where to send OTLP and where to query."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{HOST}:{OTLP_HTTP_PORT}"

    @property
    def query_url(self) -> str:
        return f"http://{HOST}:{QUERY_PORT}"

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return _get_json(f"{self.query_url}{path}{query}")


DOC = REPO / "docs" / "observability-tracing.md"
DOC_JAEGER = "~/.cache/jobtree/bin/jaeger"
NOT_RUN = {
    "jobtree-packer --otlp-endpoint http://jaeger-collector:4318": "names an in-cluster "
    "collector; the flag is tested in tests/bus/test_tracing.py and every service of "
    "traced_stack exports to this Jaeger the same way",
    "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 jobtree-local": "jobtree-local runs until "
    "Ctrl-C (tests/e2e/test_local_mode.py runs it); traced_stack starts the same stack with "
    "start_stack(otlp_endpoint=...), which is what the variable turns into",
}


def documented_commands() -> list[str]:
    """The shell commands of the page's bash blocks: continuation lines joined, comments and
    the YAML fragment (``env:`` …) of a Deployment left out."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            text = line.split("  #")[0].strip()
            if not text or text.startswith("#") or text.startswith(("env:", "-", "value:")):
                continue
            commands.append(text)
    return commands


def documented_jaeger_command() -> str:
    (command,) = [c for c in documented_commands() if DOC_JAEGER in c]
    return command.removesuffix("&").strip()


def test_every_command_of_the_tracing_page_is_run_or_excused() -> None:
    queries = [c for c in documented_commands() if c.startswith("curl ")]
    rest = set(documented_commands()) - set(queries) - {documented_jaeger_command() + " &"}
    assert rest == set(NOT_RUN), f"commands neither run nor excused: {rest - set(NOT_RUN)}"
    assert len(queries) == 4, queries


@pytest.fixture(scope="session")
def jaeger_bin() -> Path:
    """The ``jaeger`` binary (v2 all-in-one), built from the Go module proxy once."""
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(REPO / "hack" / "testbin.sh"), "jaeger"],
        check=True,
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    binary = Path(done.stdout.strip().splitlines()[-1]) / "jaeger"
    assert binary.exists(), f"testbin did not provide {binary}"
    _progress(f"jaeger binary ready in {time.monotonic() - started:.0f}s: {binary}")
    return binary


@pytest.fixture(scope="module")
def jaeger(jaeger_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    """Jaeger with its default all-in-one configuration (memory storage), bound to loopback."""
    busy = [p for p in (OTLP_HTTP_PORT, QUERY_PORT) if _listening(p)]
    assert not busy, f"ports {busy} are already in use: cannot start Jaeger's all-in-one there"
    workdir = tmp_path_factory.mktemp("jaeger")
    log = workdir / "jaeger.log"
    # Started exactly as docs/observability-tracing.md says (the binary from wherever the
    # testbin cache is): loopback receivers, query API on 16686.
    command = documented_jaeger_command().replace(DOC_JAEGER, shlex.quote(str(jaeger_bin)))
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["bash", "-c", command],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=True,
        )
    running = Jaeger(proc=proc, log=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jaeger exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(OSError, ValueError):
                if _listening(OTLP_HTTP_PORT) and "data" in running.api("/api/services"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jaeger not serving after 60s:\n{tail(log)}")
            time.sleep(0.2)
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def traced_stack(jaeger: Jaeger, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A small local Jobtree (2 nodes per fabric domain) whose services export to Jaeger."""
    with running_stack(
        tmp_path_factory.mktemp("traced-stack"),
        nodes_per_domain=2,
        gpus_per_node=8,
        ready_timeout=120.0,
        progress=_progress,
        otlp_endpoint=jaeger.otlp_endpoint,
    ) as local:
        yield local


def _apply(stack: LocalStack, *objects: dict[str, Any]) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    done = stack.kubectl("apply", "-f", "-", input=json.dumps(doc), check=False)
    assert done.returncode == 0, f"kubectl apply failed: {done.stderr}"


def _logs(stack: LocalStack, jaeger: Jaeger) -> str:
    parts = [f"--- {n} log ---\n{tail(stack.services.log_path(n), 15)}" for n in SERVICES]
    parts.append(f"--- jaeger log ---\n{tail(jaeger.log, 15)}")
    return "\n".join(parts)


@dataclass(frozen=True)
class Span:
    """One span of a Jaeger trace (v1 JSON), with the fields the checks need."""

    span_id: str
    parent: str | None
    name: str
    service: str
    kind: str
    tags: dict[str, Any]


def _spans(trace: dict[str, Any]) -> list[Span]:
    services = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
    out = []
    for raw in trace["spans"]:
        tags = {t["key"]: t["value"] for t in raw.get("tags", [])}
        parents = [r["spanID"] for r in raw.get("references", []) if r["refType"] == "CHILD_OF"]
        out.append(
            Span(
                span_id=raw["spanID"],
                parent=parents[0] if parents else None,
                name=raw["operationName"],
                service=services[raw["processID"]],
                kind=str(tags.get("span.kind", "internal")),
                tags=tags,
            )
        )
    return out


def _describe(spans: list[Span]) -> str:
    return "\n".join(
        f"  {s.service:20} {s.kind:9} {s.name} ({s.span_id} ← {s.parent})" for s in spans
    )


def _one(spans: list[Span], **match: str) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"want one span {match}, trace has:\n{_describe(spans)}"
    return found[0]


def test_run_decision_is_one_trace_across_four_services(
    traced_stack: LocalStack, jaeger: Jaeger
) -> None:
    stack = traced_stack
    started = time.monotonic()
    create_namespace(stack, NS, owners=OWNER)
    envelope = {"name": "nv-a", "flavor": "H100-80GB", "selector": NV_A, "concurrency": 16}
    budget = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Budget",
        "metadata": {"name": BUDGET},
        "spec": {"owner": OWNER, "envelopes": [envelope]},
    }
    run = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Run",
        "metadata": {"name": RUN, "namespace": NS},
        "spec": {"owner": OWNER, "resources": {"gpuType": "H100-80GB", "totalGPUs": GPUS}},
    }
    _apply(stack, budget)

    def budget_seen() -> None:
        # admission writes a Budget's status from its cache: once it has, the Run is covered
        # on first sight (no Reservation detour through a cache that lacks the Budget)
        status = get_json(stack, BUDGETS, BUDGET).get("status")
        assert status, f"Budget {BUDGET} has no status yet"

    eventually(budget_seen, timeout=30)
    _apply(stack, run)

    def running() -> dict[str, Any]:
        obj = run_object(stack, NS, RUN)
        status = obj.get("status") or {}
        assert status.get("phase") == "Running", f"Run status: {status}\n{_logs(stack, jaeger)}"
        return obj

    obj = eventually(running, timeout=60)
    uid = obj["metadata"]["uid"]
    _progress(f"Run Running {time.monotonic() - started:.1f}s after apply; reading its trace")

    # --- the Run's decision, read back from Jaeger: root span by the Run's uid ----------------
    def decision_trace() -> tuple[dict[str, Any], list[Span]]:
        found = jaeger.api(
            "/api/traces",
            service="jobtree-admission",
            operation="run.decide",
            tags=json.dumps({"jobtree.run.uid": uid}),
            lookback="1h",
            limit="20",
        )["data"]
        assert found, f"no run.decide trace for uid {uid} in Jaeger yet"
        assert len(found) == 1, f"{len(found)} decision traces for one start: {found}"
        trace = found[0]
        spans = _spans(trace)
        services = {s.service for s in spans}
        # the LEDGER hop is exported last (the forecast's batch): wait for it
        assert {"jobtree-admission", "jobtree-packer", "jobtree-binder", "jobtree-forecast"} <= (
            services
        ), f"trace {trace['traceID']} so far:\n{_describe(spans)}"
        return trace, spans

    trace, spans = eventually(decision_trace, timeout=60, interval=1.0)
    detail = f"trace {trace['traceID']}:\n{_describe(spans)}"
    assert all(s["traceID"] == trace["traceID"] for s in trace["spans"]), detail

    # --- root: the decision of this Run ------------------------------------------------------
    root = _one(spans, name="run.decide")
    assert root.service == "jobtree-admission" and root.parent is None, detail
    assert root.tags["jobtree.run.namespace"] == NS, detail
    assert root.tags["jobtree.run.name"] == RUN, detail
    assert root.tags["jobtree.run.uid"] == uid, detail

    # --- admission → packer (PLAN) and admission → binder (COMMIT), over NATS headers --------
    by_id = {s.span_id: s for s in spans}
    for subject, callee in ((PLAN, "jobtree-packer"), (COMMIT, "jobtree-binder")):
        client = _one(spans, name=subject, kind="client")
        server = _one(spans, name=subject, kind="server")
        assert client.service == "jobtree-admission" and client.parent == root.span_id, detail
        assert server.service == callee and server.parent == client.span_id, detail
        for span in (client, server):
            assert span.tags["messaging.system"] == "nats", detail
            assert span.tags["messaging.destination"] == subject, detail

    # --- binder's LEDGER event (published inside COMMIT) → forecast's durable consumer -------
    commit_served = _one(spans, name=COMMIT, kind="server")
    produced = [s for s in spans if s.name == LEDGER and s.kind == "producer"]
    assert produced, f"no LEDGER publish in the decision's trace\n{detail}"
    for producer in produced:
        assert producer.service == "jobtree-binder", detail
        ancestor = by_id.get(producer.parent or "")
        while ancestor is not None and ancestor.span_id != commit_served.span_id:
            ancestor = by_id.get(ancestor.parent or "")
        assert ancestor is not None, f"LEDGER publish {producer.span_id} not under COMMIT\n{detail}"
    consumed = [s for s in spans if s.name == LEDGER and s.kind == "consumer"]
    producer_ids = {p.span_id for p in produced}
    forecast = [s for s in consumed if s.service == "jobtree-forecast"]
    assert forecast, f"forecast did not consume the LEDGER event in this trace\n{detail}"
    for span in consumed:
        assert span.parent in producer_ids, detail
        assert span.tags["messaging.destination"] == LEDGER, detail

    # --- the same trace through the v3 (OTLP JSON) API ---------------------------------------
    v3 = jaeger.api(f"/api/v3/traces/{trace['traceID']}")
    v3_services = {
        attr["value"]["stringValue"]
        for rs in v3["result"]["resourceSpans"]
        for attr in rs["resource"]["attributes"]
        if attr["key"] == "service.name"
    }
    assert {"jobtree-admission", "jobtree-packer", "jobtree-binder", "jobtree-forecast"} <= (
        v3_services
    ), v3_services
    _progress(f"trace {trace['traceID']}: {len(spans)} spans, services {sorted(v3_services)}")


def test_the_documented_queries_find_the_run_trace(
    traced_stack: LocalStack, jaeger: Jaeger
) -> None:
    """The page's curl commands, run with bash as written (``my-run`` and ``<trace id>``
    filled with the Run of the test above and its trace), answer with that trace."""
    found = jaeger.api(
        "/api/traces", service="jobtree-admission", tags=json.dumps({"jobtree.run.name": RUN})
    )
    assert found["data"], f"no trace of {RUN}: run the whole module (the test above makes it)"
    trace_id = found["data"][0]["traceID"]
    answers = []
    for command in (c for c in documented_commands() if c.startswith("curl ")):
        filled = command.replace("my-run", RUN).replace("<trace id>", trace_id)
        done = subprocess.run(
            ["bash", "-c", filled], capture_output=True, text=True, timeout=30, check=True
        )
        answers.append(json.loads(done.stdout))
    services, by_operation, by_tag, v3 = answers
    assert "jobtree-admission" in services["data"], services
    assert any(t["traceID"] == trace_id for t in by_operation["data"]), by_operation
    assert trace_id in [t["traceID"] for t in by_tag["data"] or ()], by_tag
    assert v3["result"]["resourceSpans"], v3
