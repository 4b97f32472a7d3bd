"""Flow 4 — the administrator's sample Reservation activates on its named nodes (SPEC §2
Reservation, §3 Activation and resolver; guide §5 "simulate activation and lottery").

``config/samples/reservations/reservation-example.yaml`` promises ``gpu-a-01..08`` (64 GPUs of
nv-a, paid by ``west-h100/west-h100-nv-a``) to ``run-128-groups`` from an ``earliestStart`` in
the past. Applied before the Run exists it waits (``RunNotFound``); once the sample Run is
applied it is Reserved by it, activated at once and the Run binds on exactly the named nodes
(64 GPUs, its minimum width, paid by the named envelope): the Reservation is Released.

When another Run already holds part of the named slice, the same sample simulates the lottery:
the resolver draws among the Runs on the slice (here one fixed-width Run: one token), ends it
``RandomPreempt(<seed>)``, publishes the audit and binds the sample Run on the named nodes.
"""

from __future__ import annotations

import json
from typing import Any

from services.local.stack import LocalStack
from shared.engine.lottery import lottery_seed

from .conftest import (
    RESERVATIONS,
    RUNS,
    apply_sample,
    describe_leases,
    eventually,
    get_json,
    run_pods,
)
from .helpers import (
    NV_A,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    closure,
    envelope,
    is_open,
    log_lines,
    parse_time,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
    wait_running,
)

RUN = "run-128-groups"
RESERVATION = "reservation-example"
NAMED = [f"gpu-a-{i:02d}" for i in range(1, 9)]
SAMPLE_BUDGETS = ("west-h100", "vision-lending")
OTHER_OWNER = "e2e:admin:other"
OTHER_BUDGET = "e2e-admin-other"
SCOPE = "H100-80GB@us-west/gpu-a/nv-a"


def _reservation(stack: LocalStack, namespace: str) -> dict[str, Any]:
    obj: dict[str, Any] = get_json(stack, "-n", namespace, RESERVATIONS, RESERVATION)
    return obj


def _apply_reservation_then_run(stack: LocalStack, namespace: str) -> dict[str, Any]:
    """The sample Reservation first (it waits for its Run), then the sample Run it names."""
    apply_sample(stack, "reservations/reservation-example.yaml", namespace)

    def waiting() -> None:
        status = _reservation(stack, namespace).get("status") or {}
        assert status.get("state") == "Pending", status
        assert status.get("reason") == "RunNotFound", status

    eventually(waiting, timeout=30)
    apply_sample(stack, f"runs/{RUN}.yaml", namespace)

    def released() -> dict[str, Any]:
        obj = _reservation(stack, namespace)
        status = obj.get("status") or {}
        assert status.get("state") == "Released", (
            f"{RESERVATION} status: {json.dumps(status, indent=1)}\n"
            f"{RUN} status: {json.dumps(run_status(stack, namespace, RUN), indent=1)}"
        )
        return obj

    result: dict[str, Any] = eventually(released, timeout=60)
    return result


def _started_on_the_named_nodes(
    stack: LocalStack, namespace: str, resv: dict[str, Any]
) -> list[dict[str, Any]]:
    """The Run's bind: 64 GPUs on exactly the named nodes, paid by the named envelope."""
    status = resv["status"]
    activated = parse_time(status["activatedAt"])
    leases = all_run_leases(stack, namespace, RUN)
    detail = describe_leases(leases)
    started = [x for x in leases if x["spec"]["reason"] == "Start"]
    assert sorted(n for x in started for n in x["spec"]["slice"]["nodes"]) == NAMED, detail
    assert sum(x["spec"]["slice"]["gpus"] for x in started) == 64, detail
    assert all(is_open(x) for x in started), detail
    assert {x["spec"]["slice"]["role"] for x in started} == {"Active"}, detail
    payers = {(x["spec"]["paidByBudget"], x["spec"]["paidByEnvelope"]) for x in started}
    assert payers == {("west-h100", "west-h100-nv-a")}, detail
    for lease in started:
        assert parse_time(lease["spec"]["interval"]["start"]) >= activated, detail
    # Anything else the Run holds came later, by growing toward its desired width (SPEC §3).
    others = [x for x in leases if x["spec"]["reason"] != "Start"]
    assert {x["spec"]["reason"] for x in others} <= {"Grow"}, detail

    def pods_placed() -> None:
        pods = [p for p in run_pods(stack, namespace, RUN) if p["spec"].get("nodeName") in NAMED]
        phases = {p["metadata"]["name"]: (p.get("status") or {}).get("phase") for p in pods}
        assert sorted(p["spec"]["nodeName"] for p in pods) == NAMED, phases
        assert set(phases.values()) == {"Running"}, phases

    eventually(pods_placed, timeout=30)
    run = run_status(stack, namespace, RUN)
    assert run.get("phase") == "Running", run
    assert (run.get("width") or {}).get("allocated", 0) >= 64, run
    return started


def test_sample_reservation_binds_the_run_on_its_named_nodes(clean: LocalStack) -> None:
    stack = clean
    namespace = "e2e-admin-resv"
    setup_namespace(stack, namespace, "org:ai:*")
    try:
        apply_sample(stack, "budgets/budget-west-h100.yaml")
        apply_sample(stack, "budgets/budget-vision-lending.yaml")
        resv = _apply_reservation_then_run(stack, namespace)
        status = resv["status"]
        assert status["reason"] == "Bound", status
        assert status.get("activatedAt") and status.get("releasedAt"), status
        assert not (status.get("audit") or {}).get("seed"), f"nothing to cut: {status}"
        # The promise was made by an administrator: the forecaster recorded the Run it serves.
        labels = resv["metadata"].get("labels") or {}
        run_uid = get_json(stack, "-n", namespace, RUNS, RUN)["metadata"]["uid"]
        assert labels.get("rq.davidlangworthy.io/run-uid") == run_uid, resv["metadata"]
        assert "app.kubernetes.io/managed-by" not in labels, labels
        _started_on_the_named_nodes(stack, namespace, resv)
    finally:
        teardown(stack, namespace, SAMPLE_BUDGETS)


def test_sample_reservation_on_a_busy_slice_draws_the_lottery(clean: LocalStack) -> None:
    stack = clean
    namespace = "e2e-admin-lottery"
    setup_namespace(stack, namespace, "org:ai:*,e2e:admin:*")
    try:
        apply_sample(stack, "budgets/budget-west-h100.yaml")
        apply_sample(stack, "budgets/budget-vision-lending.yaml")
        apply_yaml(stack, budget_manifest(OTHER_BUDGET, OTHER_OWNER, [envelope("nv-a", NV_A, 16)]))
        # Another organisation's fixed-width Run takes the first two nv-a nodes (pack-to-empty,
        # whole nodes by name): part of the slice the sample promises.
        apply_yaml(
            stack, run_manifest("squatter", namespace, OTHER_OWNER, 16, group_gpus=8, selector=NV_A)
        )
        wait_running(stack, namespace, "squatter", 16, timeout=45)
        squatted = all_run_leases(stack, namespace, "squatter")
        held = sorted(n for x in squatted for n in x["spec"]["slice"]["nodes"])
        assert set(held) < set(NAMED), f"the squatter is not on the slice:\n{squatted}"

        resv = _apply_reservation_then_run(stack, namespace)
        status = resv["status"]
        assert status["reason"] == "Resolved", status
        audit = status["audit"]
        activated = parse_time(status["activatedAt"])
        seed = lottery_seed(SCOPE, resv["metadata"]["uid"], activated)
        assert audit["seed"] == seed, audit
        assert audit["conflictSet"] == [f"{namespace}/squatter"], audit
        assert [(d["step"], d["run"]) for d in audit["draws"]] == [(0, f"{namespace}/squatter")]
        ended = all_run_leases(stack, namespace, "squatter")
        assert {closure(x) for x in ended} == {f"RandomPreempt({seed})"}, describe_leases(ended)
        assert set(audit["endedLeases"]) == {x["metadata"]["name"] for x in ended}, audit
        lines = log_lines(stack, "resolver", f"RandomPreempt({seed})")
        assert len(lines) == 1, lines
        assert f"reservation={namespace}/{RESERVATION}" in lines[0], lines
        _started_on_the_named_nodes(stack, namespace, resv)

        def squatter_failed() -> None:
            cut = run_status(stack, namespace, "squatter")
            assert cut.get("phase") == "Failed", cut
            assert f"RandomPreempt({seed})" in (cut.get("message") or ""), cut

        eventually(squatter_failed, timeout=30)
    finally:
        teardown(stack, namespace, (*SAMPLE_BUDGETS, OTHER_BUDGET))
