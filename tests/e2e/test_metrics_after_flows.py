"""Observability: after a real bind the services' /metrics say exactly what happened.

A 16-GPU Run of its own owner binds; the scrape before and after shows one submission, one
bound admission, at least one binder commit and 16 opened leases, and the budget gauge equals
the GPUs its leases hold; the operator's gauges follow: one more submit→Running wait sample, the
Run counted as Running, and the fleet utilisation of its domain holding its 16 GPUs.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from services.local.stack import LocalStack

from .conftest import create_namespace, eventually, run_leases, run_object

NS = "e2e-metrics"
OWNER = "org:obs:team"
BUDGET = f"""apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {{name: obs-team}}
spec:
  owner: {OWNER}
  envelopes:
  - name: west
    flavor: H100-80GB
    selector: {{region: us-west, cluster: gpu-b, fabric.domain: nv-b}}
    concurrency: 16
"""
RUN = f"""apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {{name: observed, namespace: {NS}}}
spec:
  owner: {OWNER}
  resources: {{gpuType: H100-80GB, totalGPUs: 16}}
  locality: {{groupGPUs: 8}}
"""


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_count_a_bind(clean: LocalStack) -> None:
    stack = clean
    create_namespace(stack, NS, owners=OWNER)
    before = {name: stack.services.metrics(name) for name in ("admission", "binder", "packer")}
    stack.kubectl("apply", "-f", "-", input=BUDGET)
    stack.kubectl("apply", "-f", "-", input=RUN)

    def running() -> None:
        status = run_object(stack, NS, "observed").get("status") or {}
        assert status.get("phase") == "Running", status

    eventually(running, timeout=90)
    leases = run_leases(stack, NS, "observed")
    assert sum(x["spec"]["slice"]["gpus"] for x in leases) == 16

    def counted() -> None:
        admission = stack.services.metrics("admission")
        binder = stack.services.metrics("binder")
        flavor = {"flavor": "H100-80GB"}
        submitted = sample(admission, "jobtree_runs_submitted_total", **flavor)
        assert (
            submitted - sample(before["admission"], "jobtree_runs_submitted_total", **flavor) == 1
        )
        bound = "jobtree_runs_admission_latency_seconds_count"
        assert (
            sample(admission, bound, result="bound")
            - sample(before["admission"], bound, result="bound")
            == 1
        )
        assert sample(binder, "jobtree_binder_commits_total", result="ok") > sample(
            before["binder"], "jobtree_binder_commits_total", result="ok"
        )
        opened = sample(binder, "jobtree_binder_leases_total", event="opened") - sample(
            before["binder"], "jobtree_binder_leases_total", event="opened"
        )
        assert opened == len(leases)
        held = sample(
            admission, "jobtree_budgets_concurrency_gpus", budget="obs-team", envelope="west"
        )
        assert held == 16
        waits = "jobtree_runs_start_wait_seconds_count"
        assert (
            sample(admission, waits, **flavor) - sample(before["admission"], waits, **flavor) == 1
        )
        assert sample(admission, "jobtree_runs_current", phase="Running", **flavor) >= 1
        packer = stack.services.metrics("packer")
        domain = {"flavor": "H100-80GB", "cluster": "gpu-b", "domain": "nv-b"}
        allocated = sample(packer, "jobtree_fleet_allocated_gpus", **domain)
        assert allocated - sample(before["packer"], "jobtree_fleet_allocated_gpus", **domain) == 16
        assert sample(packer, "jobtree_fleet_allocatable_gpus", **domain) >= allocated

    eventually(counted, timeout=60)
    stack.kubectl("delete", "run", "observed", "-n", NS, "--wait=false")
    stack.kubectl("delete", "budget", "obs-team", "--wait=false")
