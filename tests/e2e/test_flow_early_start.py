"""A Reserved Run starts as soon as it fits, not at its forecast ETA.

``blocker`` holds the whole fabric domain nv-a (128 GPUs) with a 2 h walltime, so ``waiter``
(64 GPUs in nv-a) is Reserved with an ETA about 2 h away. Deleting ``blocker`` frees the domain
long before that: admission retries Reserved Runs when capacity frees, ``waiter`` binds now, and
the forecaster cancels its Reservation with reason ``StartedEarly`` (a Reservation's
earliestStart is immutable, so it cannot simply move earlier).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from services.local.stack import LocalStack

from .conftest import RESERVATIONS, eventually, get_json
from .helpers import (
    NV_A,
    apply_yaml,
    budget_manifest,
    envelope,
    parse_time,
    run_manifest,
    setup_namespace,
    teardown,
    utcnow,
    wait_phase,
    wait_running,
)

NS = "e2e-early"
OWNER = "e2e:early"
BUDGET = "e2e-early"


def test_a_reserved_run_starts_when_capacity_frees_before_its_eta(clean: LocalStack) -> None:
    stack = clean
    setup_namespace(stack, NS, OWNER)
    try:
        apply_yaml(stack, budget_manifest(BUDGET, OWNER, [envelope("a", NV_A, 256)]))
        walltime = {"maxDuration": "2h"}
        apply_yaml(stack, run_manifest("blocker", NS, OWNER, 128, selector=NV_A, runtime=walltime))
        wait_running(stack, NS, "blocker", 128)
        apply_yaml(stack, run_manifest("waiter", NS, OWNER, 64, selector=NV_A, group_gpus=64))
        reserved = wait_phase(stack, NS, "waiter", "Reserved")
        eta = parse_time(reserved["earliestStart"])
        assert eta - utcnow() > timedelta(hours=1), reserved
        name = reserved["pendingReservation"]

        stack.kubectl("delete", "runs.rq.davidlangworthy.io", "-n", NS, "blocker", "--wait=false")
        wait_running(stack, NS, "waiter", 64, timeout=90)
        assert utcnow() < eta - timedelta(hours=1), "it started at its ETA, not early"

        def canceled() -> dict[str, Any]:
            resv = get_json(stack, "-n", NS, RESERVATIONS, name)
            status = resv.get("status") or {}
            assert status.get("state") == "Canceled", status
            assert status.get("reason") == "StartedEarly", status
            return status

        eventually(canceled, timeout=60)
    finally:
        teardown(stack, NS, (BUDGET,))
