"""Flow 1 — the administrator guide's first Run binds at once (SPEC §3 cover, pack, bind).

With both sample budgets, ``run-128-groups`` (malleable 64–128 GPUs in groups of 32, sponsor
``org:vision``) starts at 128 GPUs in one gang: 96 GPUs paid by ``west-h100-nv-a`` on the first
twelve nv-a nodes and 32 borrowed from the vision lab on the first four nv-b nodes (pack-to-empty,
whole nodes, by name). Every pod is bound by ``spec.nodeName`` to a planned node and Running under
KWOK; every Lease has one payer whose selector matches its node; the Run and Budget status follow
the ledger.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from services.local.stack import LocalStack

from .conftest import (
    apply_sample,
    budget_status,
    by_name,
    create_namespace,
    describe_leases,
    eventually,
    get_json,
    node_labels,
    pod_gpus,
    run_leases,
    run_object,
    run_pods,
)

NS = "e2e-immediate"
RUN = "run-128-groups"
NV_A = [f"gpu-a-{i:02d}" for i in range(1, 13)]
NV_B = [f"gpu-b-{i:02d}" for i in range(1, 5)]
DOMAIN_KEYS = ("region", "cluster", "fabric.domain")


def _selectors(stack: LocalStack) -> dict[tuple[str, str], dict[str, str]]:
    """(budget, envelope) → selector, from the Budgets in the cluster."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for budget in get_json(stack, "budgets.rq.davidlangworthy.io")["items"]:
        for env in budget["spec"]["envelopes"]:
            out[(budget["metadata"]["name"], env["name"])] = env["selector"]
    return out


def test_run_128_groups_binds_in_one_gang(clean: LocalStack) -> None:
    stack = clean
    create_namespace(stack, NS, owners="org:ai:rai:sys")
    apply_sample(stack, "budgets/budget-west-h100.yaml")
    apply_sample(stack, "budgets/budget-vision-lending.yaml")
    apply_sample(stack, "runs/run-128-groups.yaml", NS)

    def running() -> dict[str, Any]:
        run = run_object(stack, NS, RUN)
        status = run.get("status") or {}
        assert status.get("phase") == "Running", f"Run status: {status}"
        assert (status.get("width") or {}).get("allocated") == 128, f"Run status: {status}"
        return run

    run = eventually(running, timeout=120)

    # --- Leases: one per slice, one payer each, whose selector matches the node -----------
    leases = run_leases(stack, NS, RUN)
    detail = describe_leases(leases)
    assert sum(lease["spec"]["slice"]["gpus"] for lease in leases) == 128, detail
    labels = node_labels(stack)
    selectors = _selectors(stack)
    gpus_by_payer: dict[tuple[str, str, str], int] = defaultdict(int)
    gpus_by_node: dict[str, int] = defaultdict(int)
    group_domains: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for lease in leases:
        spec = lease["spec"]
        assert spec["owner"] == "org:ai:rai:sys", detail
        assert spec["runRef"] == {"name": RUN, "namespace": NS}, detail
        assert spec["slice"]["role"] == "Active", detail
        assert spec["reason"] == "Start", detail
        assert spec.get("compPath"), f"no compPath (group/rank): {detail}"
        payer = (spec["paidByBudget"], spec["paidByEnvelope"], spec["paidByOwner"])
        gpus_by_payer[payer] += spec["slice"]["gpus"]
        selector = selectors[(payer[0], payer[1])]
        for node in spec["slice"]["nodes"]:
            gpus_by_node[node] += spec["slice"]["gpus"]
            node_sel = {k: labels[node].get(k) for k in selector}
            assert node_sel == selector, f"{lease['metadata']['name']} on {node}: {detail}"
            group_domains[spec["compPath"][0]].add(tuple(labels[node][k] for k in DOMAIN_KEYS))
    assert dict(gpus_by_payer) == {
        ("west-h100", "west-h100-nv-a", "org:ai:rai:sys"): 96,
        ("vision-lending", "vision-h100-nv-b", "org:vision"): 32,
    }, detail
    assert sorted(gpus_by_node) == NV_A + NV_B, detail
    assert all(g == 8 for g in gpus_by_node.values()), detail
    assert len(group_domains) == 4, detail
    assert all(len(d) == 1 for d in group_domains.values()), f"a group straddles domains: {detail}"
    starts = {lease["spec"]["interval"]["start"] for lease in leases}
    assert len(starts) == 1, f"one gang, one commit, one start time; got {starts}"

    # --- Pods: one per rank, bound by nodeName to the planned nodes, Running under KWOK ----
    def pods_running() -> list[dict[str, Any]]:
        pods = run_pods(stack, NS, RUN)
        phases = {p["metadata"]["name"]: (p.get("status") or {}).get("phase") for p in pods}
        assert len(pods) == 16, f"pods of the Run: {phases}"
        assert set(phases.values()) == {"Running"}, f"pod phases: {phases}"
        return pods

    pods = eventually(pods_running, timeout=90)
    uid = run["metadata"]["uid"]
    nodes = sorted(p["spec"].get("nodeName", "") for p in pods)
    assert nodes == NV_A + NV_B, f"pods bound to {nodes}"
    ranks = set()
    for pod in pods:
        assert pod_gpus(pod) == gpus_by_node[pod["spec"]["nodeName"]], pod["metadata"]["name"]
        refs = pod["metadata"]["ownerReferences"]
        assert any(r["kind"] == "Run" and r["uid"] == uid for r in refs), refs
        env = {
            e["name"]: e.get("value") for c in pod["spec"]["containers"] for e in c.get("env", [])
        }
        assert env.get("WORLD_SIZE") == "16", env
        assert env.get("MASTER_ADDR"), env
        ranks.add(int(env["RANK"]))
    assert ranks == set(range(16))
    services = get_json(stack, "-n", NS, "services")["items"]
    assert any(s["spec"].get("clusterIP") == "None" for s in services), (
        "no headless Service for the rendezvous: " + str([s["metadata"]["name"] for s in services])
    )

    # --- Run status: width and funding from the live leases --------------------------------
    status = run_object(stack, NS, RUN)["status"]
    width = status["width"]
    assert (width["min"], width["max"], width["desired"], width["allocated"]) == (
        64,
        128,
        128,
        128,
    ), status
    funding = status["funding"]
    assert funding["ownedGPUs"] == 96, funding
    assert funding.get("sharedGPUs", 0) == 0, funding
    assert funding["borrowedGPUs"] == 32, funding
    sponsor = by_name([dict(s, name=s["owner"]) for s in funding.get("sponsors", [])], "org:vision")
    assert (sponsor["kind"], sponsor["gpus"]) == ("sponsor", 32), funding

    # --- Budget status: headroom replayed from the ledger ----------------------------------
    def budgets_updated() -> None:
        west = budget_status(stack, "west-h100")
        nv_a = by_name(west.get("envelopes"), "west-h100-nv-a")
        assert nv_a["usage"]["owned"]["gpus"] == 96, west
        assert nv_a["headroom"]["concurrency"] == 0, west
        total = by_name(west.get("aggregateCaps"), "west-h100-total")
        assert total["usage"]["gpus"] == 96, west
        assert total["headroom"]["concurrency"] == 32, west
        vision = budget_status(stack, "vision-lending")
        lent = by_name(vision.get("envelopes"), "vision-h100-nv-b")
        assert lent["usage"]["borrowedOut"]["gpus"] == 32, vision
        assert lent["headroom"]["concurrency"] == 32, vision

    eventually(budgets_updated, timeout=60)
