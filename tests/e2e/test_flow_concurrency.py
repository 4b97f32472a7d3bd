"""Flow 10 — a burst of 200 Runs on a fleet that holds about half of them (SPEC §3 bind, forecast).

All 200 Runs arrive in one ``kubectl apply -f`` of a multi-document YAML. Half ask for 2 GPUs and
half for 3 (500 GPUs in all) on the seed's 32 nodes × 8 GPUs = 256 GPUs; the Budget pays for 200
GPUs in each fabric domain, more than the 128 GPUs a domain has, so capacity (not money) is what
runs out. While the admission workers, the packer and the binder race through the burst, the
Leases are sampled over and over; at every sample and at the end:

- no node holds more GPUs in open Leases than it has (8);
- no envelope pays for more GPUs than its ``concurrency``;
- no (Run, rank, node) has two Leases.

In the end every Run is ``Running`` on exactly its GPUs (and pods), or ``Reserved`` with a typed
reason in ``status.message`` and a Reservation; the fleet is essentially full. Deleting the Runs
closes every Lease.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from services.local.stack import LocalStack

from .conftest import (
    BUDGETS,
    LEASES,
    RESERVATIONS,
    RUNS,
    create_namespace,
    eventually,
    get_json,
)

NS = "e2e-burst"
OWNER = "burst:team"
"""Its own family (root ``burst``): never a relative of the samples' ``org:*`` owners, so its
Budget funds nobody else's Runs (cover shares money within a family, SPEC §3)."""
BUDGET = "e2e-burst"
RUN_COUNT = 200
SIZES = (2, 3)
"""GPUs of the Runs, alternating: 100 × 2 + 100 × 3 = 500 GPUs asked of a 256-GPU fleet."""
ENVELOPE_GPUS = 200
"""Per fabric domain: more than the 128 GPUs a domain holds, so capacity is the limit."""
NODE_GPUS = 8
FLEET_GPUS = 32 * NODE_GPUS
SETTLE_TIMEOUT = 170.0
RANK = re.compile(r"RANK\[(\d+)\]")
DOMAINS = {
    "nv-a": {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"},
    "nv-b": {"region": "us-west", "cluster": "gpu-b", "fabric.domain": "nv-b"},
}


def run_name(i: int) -> str:
    return f"burst-{i:03d}"


def run_gpus(i: int) -> int:
    return SIZES[i % len(SIZES)]


def budget_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Budget",
        "metadata": {"name": BUDGET},
        "spec": {
            "owner": OWNER,
            "envelopes": [
                {
                    "name": f"burst-{domain}",
                    "flavor": "H100-80GB",
                    "selector": selector,
                    "concurrency": ENVELOPE_GPUS,
                }
                for domain, selector in DOMAINS.items()
            ],
        },
    }


def burst_yaml() -> str:
    """200 Runs as one multi-document YAML (what a user would ``kubectl apply -f``)."""
    runs = [
        {
            "apiVersion": "rq.davidlangworthy.io/v1",
            "kind": "Run",
            "metadata": {"name": run_name(i), "namespace": NS},
            "spec": {
                "owner": OWNER,
                "resources": {"gpuType": "H100-80GB", "totalGPUs": run_gpus(i)},
                # Long enough that no Reservation activates (and preempts) during the test.
                "runtime": {"maxDuration": "2h"},
            },
        }
        for i in range(RUN_COUNT)
    ]
    return yaml.safe_dump_all(runs, sort_keys=False)


# --------------------------------------------------------------------------- invariants


def lease_is_open(lease: dict[str, Any]) -> bool:
    return not (lease.get("status") or {}).get("closed")


def envelope_caps(stack: LocalStack) -> dict[tuple[str, str], int]:
    """(budget, envelope) → concurrency, for every Budget in the cluster."""
    caps: dict[tuple[str, str], int] = {}
    for budget in get_json(stack, BUDGETS)["items"]:
        for env in budget["spec"]["envelopes"]:
            caps[(budget["metadata"]["name"], env["name"])] = int(env["concurrency"])
    return caps


def node_capacity(stack: LocalStack) -> dict[str, int]:
    nodes = get_json(stack, "nodes")["items"]
    return {
        n["metadata"]["name"]: int(n["status"]["allocatable"].get("nvidia.com/gpu", 0))
        for n in nodes
    }


def ledger_violations(
    leases: list[dict[str, Any]], capacity: dict[str, int], caps: dict[tuple[str, str], int]
) -> list[str]:
    """Every way the open Leases break the binder's invariants (empty when they hold)."""
    problems: list[str] = []
    active: dict[str, int] = defaultdict(int)
    spare: dict[str, int] = defaultdict(int)
    borrowed: dict[str, int] = defaultdict(int)
    paid: dict[tuple[str, str], int] = defaultdict(int)
    slots: Counter[tuple[str, str, str, int, str, str]] = Counter()
    for lease in leases:
        if not lease_is_open(lease):
            continue
        spec = lease["spec"]
        nodes = spec["slice"]["nodes"]
        gpus = int(spec["slice"]["gpus"])
        role = spec["slice"]["role"]
        if len(nodes) != 1:
            problems.append(f"{lease['metadata']['name']} spans nodes {nodes}")
            continue
        node = nodes[0]
        {"Spare": spare, "Borrowed": borrowed}.get(role, active)[node] += gpus
        paid[(spec["paidByBudget"], spec["paidByEnvelope"])] += gpus
        rank = RANK.search(" ".join(spec.get("compPath") or []))
        run = spec["runRef"]
        uid = lease["metadata"].get("labels", {}).get("rq.davidlangworthy.io/run-uid", "")
        slots[
            (run["namespace"], run["name"], uid, int(rank.group(1)) if rank else -1, node, role)
        ] += 1
    for node in sorted(active.keys() | spare.keys() | borrowed.keys()):
        held = active[node] + max(spare[node], borrowed[node])
        if held > capacity.get(node, 0):
            problems.append(
                f"node {node} over-committed: {held} GPUs in open Leases, "
                f"{capacity.get(node, 0)} allocatable"
            )
    for key, gpus in sorted(paid.items()):
        if key in caps and gpus > caps[key]:
            problems.append(f"envelope {key[0]}/{key[1]} pays {gpus} GPUs, cap {caps[key]}")
        if key not in caps:
            problems.append(f"envelope {key[0]}/{key[1]} pays {gpus} GPUs but does not exist")
    for slot, count in sorted(slots.items()):
        if count > 1:
            problems.append(
                f"{count} open Leases for run {slot[0]}/{slot[1]} rank {slot[3]} on "
                f"{slot[4]} ({slot[5]})"
            )
    return problems


# --------------------------------------------------------------------------- the flow


def _summary(runs: list[dict[str, Any]]) -> str:
    phases = Counter((r.get("status") or {}).get("phase") or "<none>" for r in runs)
    return ", ".join(f"{phase}: {n}" for phase, n in sorted(phases.items()))


def _unsettled(runs: list[dict[str, Any]], gpus_by_run: dict[str, int]) -> list[str]:
    """Runs not yet in their final state: Running on all their GPUs, or Reserved with a reason."""
    out = []
    for run in runs:
        name = run["metadata"]["name"]
        status = run.get("status") or {}
        phase = status.get("phase")
        want = int(run["spec"]["resources"]["totalGPUs"])
        if phase == "Running" and gpus_by_run.get(name, 0) == want:
            continue
        if phase == "Reserved" and status.get("message") and gpus_by_run.get(name, 0) == 0:
            continue
        out.append(
            f"{name}: {phase} ({gpus_by_run.get(name, 0)}/{want} GPUs) {status.get('message')}"
        )
    return out


@pytest.fixture
def burst_budget(clean: LocalStack) -> Iterator[LocalStack]:
    """The burst's Budget, removed afterwards (with any Run left) so later tests never see it."""
    clean.kubectl("apply", "-f", "-", input=yaml.safe_dump(budget_manifest()))
    yield clean
    clean.kubectl("delete", RUNS, "--all", "-n", NS, "--wait=false", check=False)
    clean.kubectl("delete", BUDGETS, BUDGET, "--ignore-not-found", check=False)


def test_burst_of_200_runs_never_overcommits(burst_budget: LocalStack) -> None:
    stack = burst_budget
    create_namespace(stack, NS, owners=OWNER)
    capacity = node_capacity(stack)
    assert sum(capacity.values()) == FLEET_GPUS, capacity
    caps = envelope_caps(stack)

    started = time.monotonic()
    stack.kubectl("apply", "-f", "-", input=burst_yaml(), timeout=120)
    assert len(get_json(stack, "-n", NS, RUNS)["items"]) == RUN_COUNT

    # Sample the ledger while the burst is processed, until every Run has settled.
    samples = 0
    peak = 0
    deadline = started + SETTLE_TIMEOUT
    while True:
        leases = get_json(stack, LEASES)["items"]
        problems = ledger_violations(leases, capacity, caps)
        samples += 1
        assert not problems, f"sample {samples} at {time.monotonic() - started:.1f}s: " + "; ".join(
            problems
        )
        mine = [
            le for le in leases if lease_is_open(le) and le["spec"]["runRef"]["namespace"] == NS
        ]
        peak = max(peak, sum(int(le["spec"]["slice"]["gpus"]) for le in mine))
        gpus_by_run: dict[str, int] = defaultdict(int)
        for lease in mine:
            gpus_by_run[lease["spec"]["runRef"]["name"]] += int(lease["spec"]["slice"]["gpus"])
        runs = get_json(stack, "-n", NS, RUNS)["items"]
        left = _unsettled(runs, gpus_by_run)
        if not left:
            break
        assert time.monotonic() < deadline, (
            f"after {SETTLE_TIMEOUT:.0f}s ({samples} ledger samples) {len(left)} Runs have not "
            f"settled ({_summary(runs)}):\n  " + "\n  ".join(left[:20])
        )
        time.sleep(1.0)
    settled_after = time.monotonic() - started
    assert samples >= 3, f"the burst settled in {settled_after:.1f}s, too fast to sample"
    print(f"flow 10: settled in {settled_after:.1f}s, {samples} ledger samples, peak {peak} GPUs")

    # --- the settled state ------------------------------------------------------------------
    by_name = {r["metadata"]["name"]: r for r in runs}
    assert sorted(by_name) == [run_name(i) for i in range(RUN_COUNT)], "a Run was lost"
    running = [n for n, r in by_name.items() if r["status"]["phase"] == "Running"]
    reserved = [n for n, r in by_name.items() if r["status"]["phase"] == "Reserved"]
    assert len(running) + len(reserved) == RUN_COUNT, _summary(runs)
    used = sum(gpus_by_run.values())
    assert used == sum(run_gpus(int(n.split("-")[1])) for n in running)
    # Capacity is the limit: Runs were only turned away once the fleet was (nearly) full.
    assert used <= FLEET_GPUS
    assert used >= FLEET_GPUS - 2 * max(SIZES), (
        f"only {used} of {FLEET_GPUS} GPUs used with {len(reserved)} Runs Reserved"
    )
    assert reserved, "500 GPUs asked of 256: some Runs must wait"
    assert 0.3 * RUN_COUNT <= len(running) <= 0.8 * RUN_COUNT, _summary(runs)
    print(f"flow 10: {len(running)} Running on {used} GPUs, {len(reserved)} Reserved")

    reservations = {
        r["metadata"]["name"]: r for r in get_json(stack, "-n", NS, RESERVATIONS)["items"]
    }
    for name in reserved:
        status = by_name[name]["status"]
        assert status.get("message"), (name, status)
        # A capacity verdict from pack, never a funding one from cover.
        scheduled = [c for c in status.get("conditions", []) if c["type"] == "Scheduled"]
        assert scheduled and scheduled[0]["status"] == "False", (name, status)
        assert scheduled[0]["reason"] in ("NoCapacity", "NoFundedCapacity"), (name, status)
        assert status.get("pendingReservation") in reservations, (name, status)
        assert status.get("earliestStart"), (name, status)
    for name in running:
        status = by_name[name]["status"]
        want = run_gpus(int(name.split("-")[1]))
        assert (status.get("width") or {}).get("allocated") == want, (name, status)

    # Pods: exactly one per rank of every Running Run, bound to the leased nodes.
    def pods_match() -> None:
        pods = get_json(stack, "-n", NS, "pods")["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        per_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for pod in live:
            per_run[pod["metadata"]["labels"].get("rq.davidlangworthy.io/run", "")].append(pod)
        assert set(per_run) == set(running), (
            f"pods for Runs {sorted(set(per_run) ^ set(running))[:10]} do not match Running Runs"
        )
        names = Counter(p["metadata"]["name"] for p in live)
        assert max(names.values()) == 1, names.most_common(3)
        per_node: dict[str, int] = defaultdict(int)
        for pod in live:
            node = pod["spec"].get("nodeName")
            assert node, f"pod {pod['metadata']['name']} not bound"
            per_node[node] += sum(
                int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
                for c in pod["spec"]["containers"]
            )
        over = {n: g for n, g in per_node.items() if g > capacity[n]}
        assert not over, f"pods over-commit nodes: {over}"
        assert sum(per_node.values()) == used

    eventually(pods_match, timeout=60)

    # --- clean up: deleting the Runs closes every Lease -------------------------------------
    stack.kubectl("delete", RUNS, "--all", "-n", NS, "--wait=false")

    def all_closed() -> None:
        left = [
            le["metadata"]["name"]
            for le in get_json(stack, LEASES)["items"]
            if lease_is_open(le) and le["spec"]["runRef"]["namespace"] == NS
        ]
        assert not left, f"{len(left)} Leases still open after their Runs were deleted"

    eventually(all_closed, timeout=90)
    print(f"flow 10: cleaned up after {time.monotonic() - started:.1f}s")
    closed = [
        le for le in get_json(stack, LEASES)["items"] if le["spec"]["runRef"]["namespace"] == NS
    ]
    reasons = Counter((le.get("status") or {}).get("closureReason") for le in closed)
    assert set(reasons) == {"Canceled"}, reasons
