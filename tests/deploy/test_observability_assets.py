"""The Grafana dashboard and the Prometheus rules name only metrics the code exports; the rules
pass `promtool check rules` and fire on the right series (`promtool test rules`); a real
ServiceRuntime's /metrics passes `promtool check metrics`."""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.bus.runtime import ServiceRuntime
from shared.localenv.natsserver import NatsServer
from tests.conftest import TESTER
from tests.deploy.conftest import DASHBOARD, REPO, RULES, run

METRIC = re.compile(r"\bjobtree_[a-z0-9_]+")
CONSTRUCTORS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def metric_definitions() -> dict[str, str]:
    """``name -> type`` of every prometheus_client metric constructed in services/ and shared/."""
    found: dict[str, str] = {}
    for path in sorted([*REPO.glob("services/**/*.py"), *REPO.glob("shared/**/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if (
                kind in CONSTRUCTORS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.startswith("jobtree_")
            ):
                found[first.value] = kind
    return found


def exposed_names(definitions: dict[str, str]) -> set[str]:
    """The series names prometheus_client exposes for each definition (its suffix rules)."""
    names: set[str] = set()
    for name, kind in definitions.items():
        if kind == "Counter":
            base = name.removesuffix("_total")
            names |= {f"{base}_total", f"{base}_created"}
        elif kind == "Histogram":
            names |= {name, *(f"{name}_{s}" for s in ("bucket", "sum", "count", "created"))}
        elif kind == "Summary":
            names |= {name, *(f"{name}_{s}" for s in ("sum", "count", "created"))}
        elif kind == "Info":
            names.add(f"{name}_info")
        else:  # Gauge, Enum
            names.add(name)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    definitions = metric_definitions()
    assert "jobtree_runs_admission_latency_seconds" in definitions, "metric scan found nothing"
    return exposed_names(definitions)


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p.get("type") != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


# ------------------------------------------------------------------------------ dashboard


def test_dashboard_names_only_exported_metrics(exported: set[str]) -> None:
    used = {m for text in strings(dashboard()) for m in METRIC.findall(text)}
    assert used, "the dashboard queries no jobtree metric"
    assert used <= exported, f"not exported by any service: {sorted(used - exported)}"


def test_dashboard_has_the_admin_guide_panels() -> None:
    by_title = {p["title"]: p for p in panels()}
    wanted = {
        "Budget headroom per envelope": "jobtree_budget_headroom_gpus",
        "Reservation backlog": "jobtree_reservations_backlog_seconds",
        "Reservation ETA buckets": "jobtree_reservation_eta_seconds_bucket",
        "Preemption rate by scope": "by (scope)",
        "Admission latency p50/p95/p99": "jobtree_runs_admission_latency_seconds_bucket",
        "Binder commits and conflicts": "jobtree_binder_conflicts_total",
        "Spares": 'class="spare"',
    }
    for prefix, needle in wanted.items():
        matching = [p for title, p in by_title.items() if title.startswith(prefix)]
        assert matching, f"no panel {prefix!r}"
        assert any(needle in t["expr"] for p in matching for t in p["targets"]), prefix
    quantiles = [t["expr"] for t in by_title["Admission latency p50/p95/p99"]["targets"]]
    assert [q.split(",")[0] for q in quantiles] == [
        f"histogram_quantile({q}" for q in ("0.5", "0.95", "0.99")
    ]


def test_dashboard_is_importable() -> None:
    data = dashboard()
    assert data["uid"] and data["title"] and data["schemaVersion"] >= 30
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))


def _grafana_free(expr: str) -> str:
    """Substitute Grafana's template variables so Prometheus itself can parse the query."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
    return re.sub(r"\$[a-z_]+", ".*", expr)


def test_dashboard_queries_parse(deploy_bin: Path, tmp_path: Path) -> None:
    """Each query is valid PromQL: promtool checks them as recording rules."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": _grafana_free(e)}
                    for i, e in enumerate(exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    run([deploy_bin / "promtool", "check", "rules", path])


# ------------------------------------------------------------------------------ rules


def test_rules_pass_promtool(deploy_bin: Path) -> None:
    done = run([deploy_bin / "promtool", "check", "rules", RULES])
    assert "SUCCESS" in done.stdout


def test_rules_name_only_exported_metrics(exported: set[str]) -> None:
    data = yaml.safe_load(RULES.read_text())
    used = {m for text in strings(data) for m in METRIC.findall(text)}
    assert used <= exported, f"not exported by any service: {sorted(used - exported)}"
    alerts = {r["alert"] for g in data["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "JobtreeReservationDelay",
        "JobtreeResolverStorm",
        "JobtreeBudgetNearExhaustion",
    } <= alerts


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # 30 Pending Reservations waiting 8h each on average, for 2 hours
      - series: 'jobtree_reservations_current{{state="Pending", service="forecast"}}'
        values: '30x120'
      - series: 'jobtree_reservations_backlog_seconds{{service="forecast"}}'
        values: '864000x120'
      # 12 leases a minute cut in scope nv-a, for an hour
      - series: 'jobtree_preemptions_total{{scope="nv-a", reason="RandomPreempt"}}'
        values: '0+12x60'
      - series: 'jobtree_preemptions_total{{scope="nv-b", reason="Shrink"}}'
        values: '0+0x60'
      # an envelope with 4 of 96 GPUs left; another one idle with headroom 0 and no usage
      - series: 'jobtree_budget_headroom_gpus{{budget="west-h100", envelope="west-h100-nv-a"}}'
        values: '4x60'
      - series: >-
          jobtree_budgets_concurrency_gpus{{owner="org:ai:rai:sys", budget="west-h100",
          envelope="west-h100-nv-a", flavor="H100-80GB", class="owned"}}
        values: '92x60'
      - series: 'jobtree_budget_headroom_gpus{{budget="idle", envelope="idle-a"}}'
        values: '0x60'
      # the binder is down for good after 10 minutes, the packer is never scraped, no binder
      # leads, the forecaster fails 6 requests a minute, two nodes lack labels
      - series: 'up{{endpoint="binder", job="jobtree-metrics"}}'
        values: '1x10 0x50'
      - series: 'up{{endpoint="admission", job="jobtree-metrics"}}'
        values: '1x60'
      - series: 'up{{endpoint="forecast", job="jobtree-metrics"}}'
        values: '1x60'
      - series: 'up{{endpoint="resolver", job="jobtree-metrics"}}'
        values: '1x60'
      - series: 'jobtree_binder_leader{{service="binder"}}'
        values: '0x60'
      - series: >-
          jobtree_handler_errors_total{{service="forecast", subject="jobtree.v1.forecast.reserve"}}
        values: '0+6x60'
      - series: 'jobtree_nodes_missing_labels{{service="packer"}}'
        values: '2x60'
    alert_rule_test:
      - eval_time: 60m
        alertname: JobtreeReservationDelay
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreereservationdelay
              summary: Pending Reservations wait more than 6 hours on average
              description: >-
                30 Reservations are Pending with a mean wait of 8h 0m 0s until their
                earliestStart. The fleet is short of capacity or budgets: check `kubectl runs
                plan <run>` for deficits and remedies.
      - eval_time: 40m
        alertname: JobtreeResolverStorm
        exp_alerts:
          - exp_labels: {{severity: critical, scope: nv-a}}
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreeresolverstorm
              summary: Preemption storm in scope nv-a
              description: >-
                The resolver ends 12.0 leases per minute in scope nv-a (15 minutes running).
                Review the resolver's RandomPreempt log lines (seed and conflict set) and
                `kubectl runs explain`.
      - eval_time: 45m
        alertname: JobtreeBudgetNearExhaustion
        exp_alerts:
          - exp_labels: {{severity: warning, budget: west-h100, envelope: west-h100-nv-a}}
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreebudgetnearexhaustion
              summary: Envelope west-h100/west-h100-nv-a is nearly exhausted
              description: >-
                Only 4.167% of the envelope's concurrency is left; new Runs it pays will be
                reserved instead of bound. Raise the envelope, add lending or expect
                Reservations.
      - eval_time: 10m
        alertname: JobtreeResolverStorm
        exp_alerts: []
      - eval_time: 20m
        alertname: JobtreeServiceDown
        exp_alerts:
          - exp_labels: {{severity: critical, endpoint: binder}}
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreeservicedown
              summary: Jobtree binder is down
              description: >-
                Prometheus cannot scrape the binder service's /metrics. Without it Runs are
                not admitted (admission), placed (packer), reserved (forecast), activated
                (resolver) or bound (binder).
      - eval_time: 20m
        alertname: JobtreeServiceAbsent
        exp_alerts:
          - exp_labels: {{severity: critical, endpoint: packer}}
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreeserviceabsent
              summary: Jobtree packer is not scraped at all
              description: >-
                No scrape target exists for the packer service: its Deployment is scaled to
                zero or deleted, or the ServiceMonitor no longer selects it.
      - eval_time: 10m
        alertname: JobtreeNoBinderLeader
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreenobinderleader
              summary: No binder holds the writer Lease
              description: >-
                No binder instance is the active writer, so no commit (start, swap, lease end)
                is written. Check the binder pods and the coordination Lease in the release
                namespace.
      - eval_time: 30m
        alertname: JobtreeHandlerErrors
        exp_alerts:
          - exp_labels:
              severity: warning
              service: forecast
              subject: jobtree.v1.forecast.reserve
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreehandlererrors
              summary: forecast fails requests on jobtree.v1.forecast.reserve
              description: >-
                0.10 handler errors per second for 10 minutes: the service keeps raising while
                serving jobtree.v1.forecast.reserve. Its logs carry the traceback.
      - eval_time: 30m
        alertname: JobtreeNodesMissingLabels
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              runbook_url: https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#jobtreenodesmissinglabels
              summary: 2 GPU nodes are ignored for missing topology labels
              description: >-
                Nodes without region, cluster, fabric.domain or gpu.flavor get no placements.
                Label them as the installation guide shows.
"""


RUNBOOKS = REPO / "docs" / "runbooks.md"
RUNBOOK_PREFIX = "https://github.com/davidlangworthy/jobtree/blob/main/docs/runbooks.md#"


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    data = yaml.safe_load(RULES.read_text())
    headings = {
        line.removeprefix("## ").strip().lower()
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    alerts = [r for g in data["groups"] for r in g["rules"] if "alert" in r]
    assert {
        "JobtreeServiceDown",
        "JobtreeServiceAbsent",
        "JobtreeNoBinderLeader",
        "JobtreeHandlerErrors",
        "JobtreeNodesMissingLabels",
    } <= {r["alert"] for r in alerts}
    for rule in alerts:
        url = rule["annotations"].get("runbook_url", "")
        assert url == RUNBOOK_PREFIX + rule["alert"].lower(), rule["alert"]
        assert rule["alert"].lower() in headings, f"docs/runbooks.md has no ## {rule['alert']}"


def test_alerts_fire_on_the_right_series(deploy_bin: Path, tmp_path: Path) -> None:
    path = tmp_path / "rules-test.yaml"
    path.write_text(RULE_TESTS.format(rules=json.dumps(str(RULES))))
    done = run([deploy_bin / "promtool", "test", "rules", path])
    assert "SUCCESS" in done.stdout


# ------------------------------------------------------------------------------ /metrics


async def _scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    if "transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return body


def _dechunk(body: str) -> str:
    out, rest = [], body
    while rest:
        size_text, _, rest = rest.partition("\r\n")
        size = int(size_text.strip() or "0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return "".join(out)


@pytest.mark.nats
@pytest.mark.asyncio(loop_scope="session")
async def test_runtime_metrics_pass_promtool(
    nats_server: NatsServer, deploy_bin: Path, exported: set[str]
) -> None:
    # every service's metric module registers its families in this process, as in a service
    for name in ("admission", "packer", "forecast", "resolver", "binder"):
        importlib.import_module(f"services.{name}.metrics")
    runtime = ServiceRuntime(
        "deploycheck", nats_url=nats_server.url, credentials=nats_server.credentials(TESTER)
    )
    await runtime.start()
    try:
        text = await _scrape(runtime.http_port)
    finally:
        await runtime.stop()
    assert 'jobtree_service_info{service="deploycheck"' in text
    done = run([deploy_bin / "promtool", "check", "metrics"], input=text, check=False)
    assert done.returncode == 0, f"promtool check metrics:\n{done.stdout}{done.stderr}"
    # what the process really exposes agrees with the static scan, and it serves every metric
    # the dashboard queries
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE jobtree_")}
    assert families <= exported, sorted(families - exported)
    used = {m for t in strings(dashboard()) for m in METRIC.findall(t)}
    for name in used:
        stem = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in families or stem in families, f"{name} is not served by /metrics"
