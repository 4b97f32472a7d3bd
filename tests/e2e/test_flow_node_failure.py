"""Flow 5 — a node fails under running gangs (SPEC §1 Topology; §3 Failures, spares,
opportunistic fill).

The failure is a KWOK node deleted with ``kubectl delete node`` (the packer reports a deleted node
at once; a NotReady node only after ``--node-grace-seconds``, 30 s in the stack). Each test puts
the node back afterwards, labelled and Ready, for the tests that follow.

* **Swap onto the spare.** ``run-with-spares`` (two groups of 16 GPUs, one 8-GPU spare node per
  group): the failed rank's lease closes ``NodeFailure``, its group's spare closes ``Swap``, a new
  Active lease (reason ``Swap``, same group, rank and payer) starts on the spare's node and the
  rank's pod is recreated there with the same rank and world size. The Run keeps running.
* **Opportunistic fill, reclaimed by a swap.** Two opportunistic Runs (``spec.opportunistic``)
  are placed inside ``run-with-spares``' two spare nodes: one ``Borrowed`` lease each (reason
  ``Fill``, on the spare's node, paid by their own envelope), their pods bound there, Running.
  A rank under the checkpointed one's spare fails: its fill closes ``ReclaimedBySpare`` in the
  swap's commit, and it is requeued (``status.restarts`` 1) onto free GPUs as an ordinary
  placement, since the other spare is filled. A rank under the other fails likewise: that Run
  declares no checkpoint, so it ends Failed with reason ``ReclaimedBySpare``.
* **No spare.** A malleable Run loses the failed group (``NodeFailure`` on the failed node,
  ``Shrink`` for the group's other lease) and keeps running; a checkpointed fixed-width Run ends
  (``NodeFailure``/``Fail``) and is requeued from its checkpoint: ``status.restarts`` 1 and new
  leases, away from the failed node.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from services.local.stack import LocalStack
from shared.localenv.fleet import SEED_FLEET, node_manifest

from .conftest import apply_sample, describe_leases, eventually, run_pods
from .helpers import (
    NV_A,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    closure,
    condition,
    envelope,
    is_open,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
    wait_phase,
)

SPARES_RUN = "run-with-spares"
FILL_OWNER = "e2e:nodefail:fill"
FILL_BUDGET = "e2e-nodefail-fill"
NV_A_NODES = [f"gpu-a-{i:02d}" for i in range(1, 17)]


# ---------------------------------------------------------------------------- helpers


def _labels_of(node: str) -> dict[str, str]:
    for prefix, labels in SEED_FLEET:
        if node.startswith(f"{prefix}-"):
            return dict(labels)
    raise AssertionError(f"{node} is not a node of the seed fleet")


@pytest.fixture
def failed_nodes(stack: LocalStack) -> Iterator[list[str]]:
    """Names the test deletes; each is re-created (labelled, KWOK-managed) and waited Ready."""
    names: list[str] = []
    yield names
    for name in names:
        manifest = node_manifest(name, _labels_of(name))
        stack.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    if names:
        stack.kubectl(
            "wait", "--for=condition=Ready", "--timeout=60s", *(f"node/{n}" for n in names)
        )


def _fail(stack: LocalStack, failed: list[str], node: str) -> None:
    """The node disappears: ``kubectl delete node`` (re-created by ``failed_nodes``)."""
    failed.append(node)
    stack.kubectl("delete", "node", node, "--wait=true")


def _open(stack: LocalStack, namespace: str, run: str) -> list[dict[str, Any]]:
    return [x for x in all_run_leases(stack, namespace, run) if is_open(x)]


def _node(lease: dict[str, Any]) -> str:
    (node,) = lease["spec"]["slice"]["nodes"]
    return str(node)


def _path(lease: dict[str, Any]) -> tuple[int, str]:
    """(group, "RANK[r]" | "SPARE[s]") from ``compPath``."""
    group, member = lease["spec"]["compPath"]
    found = re.fullmatch(r"GROUP\[(\d+)\]", group)
    assert found, lease["spec"]["compPath"]
    return int(found.group(1)), str(member)


def _role(lease: dict[str, Any]) -> str:
    return str(lease["spec"]["slice"]["role"])


def _env(pod: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for c in pod["spec"]["containers"] for e in c.get("env", [])}


def _started(
    stack: LocalStack,
    namespace: str,
    run: str,
    active: int = 0,
    spare: int = 0,
    borrowed: int = 0,
) -> None:
    """Running with ``active``, ``spare`` and ``borrowed`` GPUs of leases of those roles."""

    def check() -> None:
        status = run_status(stack, namespace, run)
        assert status.get("phase") == "Running", f"{run}: {status}"
        live = _open(stack, namespace, run)
        held: dict[str, int] = {}
        for lease in live:
            held[_role(lease)] = held.get(_role(lease), 0) + lease["spec"]["slice"]["gpus"]
        roles = {"Active": active, "Spare": spare, "Borrowed": borrowed}
        want = {role: gpus for role, gpus in roles.items() if gpus}
        assert held == want, f"{run} holds {held}, want {want}:\n{describe_leases(live)}"

    eventually(check, timeout=45)


def _spares_run(stack: LocalStack, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sample Run with spares, running; returns (the lease of group 0 rank 0, its spare)."""
    apply_sample(stack, f"runs/{SPARES_RUN}.yaml", namespace)
    _started(stack, namespace, SPARES_RUN, active=32, spare=16)
    leases = _open(stack, namespace, SPARES_RUN)
    by_path = {_path(x): x for x in leases}
    rank0 = by_path[(0, "RANK[0]")]
    (spare,) = [x for (g, member), x in by_path.items() if g == 0 and member.startswith("SPARE")]
    return rank0, spare


def _swapped(
    stack: LocalStack, namespace: str, failed: dict[str, Any], spare: dict[str, Any]
) -> dict[str, Any]:
    """Wait for the swap and check it: closures, the new lease, the moved pod."""
    target = _node(spare)

    def check() -> dict[str, Any]:
        leases = {x["metadata"]["name"]: x for x in all_run_leases(stack, namespace, SPARES_RUN)}
        detail = describe_leases(list(leases.values()))
        assert closure(leases[failed["metadata"]["name"]]) == "NodeFailure", detail
        assert closure(leases[spare["metadata"]["name"]]) == "Swap", detail
        new = [
            x
            for x in leases.values()
            if is_open(x)
            and x["spec"]["reason"] == "Swap"
            and _role(x) == "Active"
            and _path(x) == _path(failed)
        ]
        assert len(new) == 1, f"want one Active lease with reason Swap for the rank:\n{detail}"
        return new[0]

    new: dict[str, Any] = eventually(check, timeout=30)
    detail = describe_leases([failed, spare, new])
    assert _node(new) == target, detail
    assert new["spec"]["slice"]["gpus"] == failed["spec"]["slice"]["gpus"], detail
    for key in ("paidByBudget", "paidByEnvelope", "paidByOwner", "owner"):
        assert new["spec"].get(key) == failed["spec"].get(key), detail

    group, member = _path(failed)
    rank = member.removeprefix("RANK[").removesuffix("]")

    def pod_moved() -> None:
        pods = {p["metadata"]["name"]: p for p in run_pods(stack, namespace, SPARES_RUN)}
        pod = pods.get(f"{SPARES_RUN}-g{group}-r{rank}")
        assert pod is not None, f"rank {rank}'s pod is gone: {sorted(pods)}"
        assert pod["spec"].get("nodeName") == target, pod["spec"].get("nodeName")
        assert (pod.get("status") or {}).get("phase") == "Running", pod.get("status")
        env = _env(pod)
        assert (env.get("RANK"), env.get("WORLD_SIZE")) == (rank, "4"), env
        nodes = sorted(p["spec"].get("nodeName") for p in pods.values())
        assert len(nodes) == 4 and failed["spec"]["slice"]["nodes"][0] not in nodes, nodes

    eventually(pod_moved, timeout=30)
    status = run_status(stack, namespace, SPARES_RUN)
    assert status.get("phase") == "Running" and status.get("restarts", 0) == 0, status
    assert (status.get("width") or {}).get("allocated") == 32, status
    return new


# ---------------------------------------------------------------------------- swap


def test_node_failure_swaps_the_rank_onto_its_spare(
    clean: LocalStack, failed_nodes: list[str]
) -> None:
    stack = clean
    namespace = "e2e-nodefail-swap"
    setup_namespace(stack, namespace, "org:ai:*")
    try:
        apply_sample(stack, "budgets/budget-west-h100.yaml")
        rank0, spare = _spares_run(stack, namespace)
        untouched = {
            x["metadata"]["name"]
            for x in _open(stack, namespace, SPARES_RUN)
            if x["metadata"]["name"] not in (rank0["metadata"]["name"], spare["metadata"]["name"])
        }
        _fail(stack, failed_nodes, _node(rank0))
        _swapped(stack, namespace, rank0, spare)
        still = {x["metadata"]["name"] for x in _open(stack, namespace, SPARES_RUN)}
        assert untouched < still, f"other leases changed: {untouched - still}"
        assert len(still) == 5, still  # 3 untouched ranks + group 1's spare + the swapped rank
    finally:
        teardown(stack, namespace, ("west-h100",))


# ---------------------------------------------------------------------------- opportunistic fill


def _fill(stack: LocalStack, namespace: str, run: str, spares: set[str]) -> dict[str, Any]:
    """The opportunistic Run runs as fill on a spare: one Borrowed lease, its pod bound there."""
    _started(stack, namespace, run, borrowed=8)
    (lease,) = _open(stack, namespace, run)
    detail = describe_leases([lease])
    assert _node(lease) in spares, f"not on a spare node {sorted(spares)}:\n{detail}"
    assert lease["spec"]["reason"] == "Fill", detail
    assert lease["spec"]["owner"] == FILL_OWNER, detail
    paid = (lease["spec"]["paidByBudget"], lease["spec"]["paidByEnvelope"])
    assert paid == (FILL_BUDGET, "nv-a"), f"paid by {paid}, not its own envelope"

    def bound() -> None:
        (pod,) = run_pods(stack, namespace, run)
        assert pod["spec"].get("nodeName") == _node(lease), pod["spec"].get("nodeName")
        assert (pod.get("status") or {}).get("phase") == "Running", pod.get("status")
        assert (_env(pod).get("RANK"), _env(pod).get("WORLD_SIZE")) == ("0", "1"), _env(pod)

    eventually(bound, timeout=30)
    assert (run_status(stack, namespace, run).get("width") or {}).get("allocated") == 8
    return lease


def _reclaim(
    stack: LocalStack,
    namespace: str,
    failed: list[str],
    fill: tuple[str, dict[str, Any]],
    spare: dict[str, Any],
) -> None:
    """A rank of the group owning ``spare`` fails: the swap onto the spare reclaims the fill
    (``(run, lease)``) in the same commit."""
    group = _path(spare)[0]
    ranks = [x for x in _open(stack, namespace, SPARES_RUN) if _role(x) == "Active"]
    rank = min((x for x in ranks if _path(x)[0] == group), key=_path)
    _fail(stack, failed, _node(rank))
    _swapped(stack, namespace, rank, spare)
    run, lease = fill
    leases = {x["metadata"]["name"]: x for x in all_run_leases(stack, namespace, run)}
    ended = leases[lease["metadata"]["name"]]
    assert closure(ended) == "ReclaimedBySpare", describe_leases(list(leases.values()))

    def pod_gone() -> None:
        live = [
            p for p in run_pods(stack, namespace, run) if not p["metadata"].get("deletionTimestamp")
        ]
        assert all(p["spec"].get("nodeName") != _node(lease) for p in live), "fill pod still there"

    eventually(pod_gone, timeout=30)


def test_opportunistic_fill_runs_on_spares_until_a_swap_reclaims_it(
    clean: LocalStack, failed_nodes: list[str]
) -> None:
    stack = clean
    namespace = "e2e-nodefail-fill"
    setup_namespace(stack, namespace, f"org:ai:*,{FILL_OWNER}")
    try:
        apply_sample(stack, "budgets/budget-west-h100.yaml")
        # 16 GPUs at once: both fills, but not also a spare for "scratch", which asks for one
        # (fill holds no spares, so admission funds it without).
        apply_yaml(stack, budget_manifest(FILL_BUDGET, FILL_OWNER, [envelope("nv-a", NV_A, 16)]))
        _spares_run(stack, namespace)
        spares = {_node(x): x for x in _open(stack, namespace, SPARES_RUN) if _role(x) == "Spare"}
        assert len(spares) == 2, describe_leases(list(spares.values()))

        # --- two opportunistic Runs fill the two spare nodes ----------------------------------
        runtimes = {"sweep": {"checkpoint": "10m", "maxRestarts": 2}, "scratch": None}
        fills: dict[str, dict[str, Any]] = {}
        for run, runtime in runtimes.items():
            extra: dict[str, Any] = {"runtime": runtime} if runtime else {"sparesPerGroup": 8}
            apply_yaml(
                stack,
                run_manifest(
                    run,
                    namespace,
                    FILL_OWNER,
                    8,
                    group_gpus=8,
                    selector=NV_A,
                    opportunistic=True,
                    **extra,
                ),
            )
            fills[run] = _fill(stack, namespace, run, set(spares))
        assert _node(fills["sweep"]) != _node(fills["scratch"]), "two fills on one spare"

        # --- a swap reclaims the checkpointed fill: requeued, now on free GPUs ----------------
        _reclaim(
            stack, namespace, failed_nodes, ("sweep", fills["sweep"]), spares[_node(fills["sweep"])]
        )

        def requeued() -> None:
            status = run_status(stack, namespace, "sweep")
            assert status.get("restarts") == 1, f"sweep: {json.dumps(status)}"
            cond = condition(status, "Requeued")
            assert cond is not None and cond["status"] == "True", status
            assert cond["reason"] == "ReclaimedBySpare", cond

        eventually(requeued, timeout=45)
        # The other spare is filled already, so the new attempt is an ordinary placement.
        _started(stack, namespace, "sweep", active=8)
        (again,) = _open(stack, namespace, "sweep")
        assert again["spec"]["reason"] == "Start", describe_leases([again])
        assert _node(again) not in {*spares, *failed_nodes}, describe_leases([again])

        # --- a swap reclaims the fill without a checkpoint: the Run fails -------------------
        _reclaim(
            stack,
            namespace,
            failed_nodes,
            ("scratch", fills["scratch"]),
            spares[_node(fills["scratch"])],
        )
        status = wait_phase(stack, namespace, "scratch", "Failed", timeout=45)
        cond = condition(status, "Failed")
        assert cond is not None and cond["reason"] == "ReclaimedBySpare", status
        assert status.get("restarts", 0) == 0, status
    finally:
        teardown(stack, namespace, ("west-h100", FILL_BUDGET))


# ---------------------------------------------------------------------------- no spare


def test_without_a_spare_a_malleable_run_shrinks_and_a_fixed_run_is_requeued(
    clean: LocalStack, failed_nodes: list[str]
) -> None:
    stack = clean
    namespace = "e2e-nodefail-nospare"
    setup_namespace(stack, namespace, "e2e:nodefail:*")
    try:
        apply_yaml(stack, budget_manifest(FILL_BUDGET, FILL_OWNER, [envelope("nv-a", NV_A, 128)]))
        apply_yaml(
            stack,
            run_manifest(
                "elastic",
                namespace,
                FILL_OWNER,
                48,
                group_gpus=16,
                selector=NV_A,
                malleable={"minTotalGPUs": 16, "maxTotalGPUs": 48, "stepGPUs": 16},
            ),
        )
        _started(stack, namespace, "elastic", active=48)
        apply_yaml(
            stack,
            run_manifest(
                "ckpt",
                namespace,
                FILL_OWNER,
                16,
                group_gpus=8,
                selector=NV_A,
                runtime={"checkpoint": "10m", "maxRestarts": 2},
            ),
        )
        _started(stack, namespace, "ckpt", active=16)
        elastic = _open(stack, namespace, "elastic")
        group1 = sorted((x for x in elastic if _path(x)[0] == 1), key=_path)
        assert len(group1) == 2, describe_leases(elastic)
        failed_elastic, partner = group1
        first_attempt = _open(stack, namespace, "ckpt")
        failed_ckpt = first_attempt[0]

        _fail(stack, failed_nodes, _node(failed_elastic))
        _fail(stack, failed_nodes, _node(failed_ckpt))

        # --- the malleable Run loses group 1 only, and keeps running --------------------------
        def shrunk() -> None:
            leases = {x["metadata"]["name"]: x for x in all_run_leases(stack, namespace, "elastic")}
            detail = describe_leases(list(leases.values()))
            assert closure(leases[failed_elastic["metadata"]["name"]]) == "NodeFailure", detail
            assert closure(leases[partner["metadata"]["name"]]) == "Shrink", detail
            for lease in elastic:
                if _path(lease)[0] != 1:
                    assert is_open(leases[lease["metadata"]["name"]]), detail

        eventually(shrunk, timeout=30)
        status = run_status(stack, namespace, "elastic")
        assert status.get("phase") == "Running", status
        assert status.get("restarts", 0) == 0, status

        # --- the checkpointed fixed Run is requeued: restart 1, a new attempt -----------------
        def requeued() -> dict[str, Any]:
            status = run_status(stack, namespace, "ckpt")
            assert status.get("restarts") == 1, f"ckpt: {json.dumps(status)}"
            assert status.get("phase") == "Running", f"ckpt: {json.dumps(status)}"
            cond = condition(status, "Requeued")
            assert cond is not None and cond["status"] == "True", status
            return status

        eventually(requeued, timeout=45)
        ended = {x["metadata"]["name"]: x for x in all_run_leases(stack, namespace, "ckpt")}
        old = [ended[x["metadata"]["name"]] for x in first_attempt]
        detail = describe_leases(list(ended.values()))
        assert closure(old[0]) == "NodeFailure", detail
        assert {closure(x) for x in old[1:]} <= {"Fail", "NodeFailure"}, detail
        _started(stack, namespace, "ckpt", active=16)
        fresh = _open(stack, namespace, "ckpt")
        assert not {x["metadata"]["name"] for x in fresh} & {
            x["metadata"]["name"] for x in first_attempt
        }, detail
        assert {x["spec"]["reason"] for x in fresh} == {"Start"}, describe_leases(fresh)
        assert not {_node(x) for x in fresh} & set(failed_nodes), describe_leases(fresh)
        pods = [
            p
            for p in run_pods(stack, namespace, "ckpt")
            if not p["metadata"].get("deletionTimestamp")
        ]
        assert sorted(p["spec"].get("nodeName") for p in pods) == sorted(_node(x) for x in fresh), [
            p["spec"].get("nodeName") for p in pods
        ]
    finally:
        teardown(stack, namespace, (FILL_BUDGET,))
