"""Flow 8 — a Budget window that opens in the future (SPEC §2 Budget envelope, §3 Reservations
and forecast).

The owner's only envelope opens ``now + 40 s`` (ends two hours later):

* with ``preActivation {allowReservations: true, allowAdmission: false}`` a Run cannot start
  now but gets a Reservation whose ``earliestStart`` is the window start, confidence
  ``window-aligned``; when the window opens the Reservation activates and the Run runs, with
  Leases starting at or after the window start;
* with ``allowAdmission: true`` the same Run binds at once, before the window opens.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from services.local.stack import LocalStack

from .conftest import RESERVATIONS, describe_leases, eventually, get_json
from .helpers import (
    NV_B,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    envelope,
    future,
    is_open,
    parse_time,
    rfc3339,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
    utcnow,
    wait_running,
)

NS = "e2e-window"
OWNER = "window:team"
BUDGET = "e2e-window"
EARLY_BUDGET = "e2e-window-early"
ENVELOPE = "window-nv-b"
LEAD_SECONDS = 40


def _budget(name: str, start_in: float, *, allow_admission: bool) -> tuple[dict[str, Any], Any]:
    start = future(start_in)
    env = envelope(
        ENVELOPE,
        NV_B,
        64,
        start=rfc3339(start),
        end=rfc3339(start + timedelta(hours=2)),
        preActivation={"allowReservations": True, "allowAdmission": allow_admission},
    )
    return budget_manifest(name, OWNER, [env]), start


def _run(name: str) -> dict[str, Any]:
    return run_manifest(name, NS, OWNER, 16, group_gpus=16, runtime={"maxDuration": "30m"})


def test_future_window_reserves_then_starts_when_it_opens(clean: LocalStack) -> None:
    stack = clean
    setup_namespace(stack, NS, "window:*")
    try:
        budget, start = _budget(BUDGET, LEAD_SECONDS, allow_admission=False)
        apply_yaml(stack, budget)
        apply_yaml(stack, _run("wait-window"))

        def reserved() -> dict[str, Any]:
            status = run_status(stack, NS, "wait-window")
            assert status.get("phase") == "Reserved", f"Run status: {status}"
            assert status.get("pendingReservation"), status
            return status

        status = eventually(reserved, timeout=30)
        assert utcnow() < start, "the test was too slow to see the Run before the window"
        assert parse_time(status["earliestStart"]) == start, (
            f"Run earliestStart {status['earliestStart']} != window start {rfc3339(start)}"
        )
        name = status["pendingReservation"]

        def forecast_published() -> dict[str, Any]:
            resv: dict[str, Any] = get_json(stack, "-n", NS, RESERVATIONS, name)
            st = resv.get("status") or {}
            assert st.get("state") == "Pending", f"Reservation {name}: {st}"
            assert (st.get("forecast") or {}).get("confidence") == "window-aligned", st
            return resv

        resv = eventually(forecast_published, timeout=20)
        spec = resv["spec"]
        assert spec["runRef"]["name"] == "wait-window", spec
        assert parse_time(spec["earliestStart"]) == start, spec
        assert spec.get("payingEnvelope") == f"{BUDGET}/{ENVELOPE}", spec
        assert resv["status"].get("countdownSeconds", 0) > 0, resv["status"]
        assert not all_run_leases(stack, NS, "wait-window"), "Leases before the window opened"

        # --- the window opens: the Reservation activates and the Run starts -------------------
        wait_running(stack, NS, "wait-window", 16, timeout=LEAD_SECONDS + 30)
        opened = utcnow()
        assert opened >= start, f"Running at {opened}, before the window start {start}"
        leases = [x for x in all_run_leases(stack, NS, "wait-window") if is_open(x)]
        detail = describe_leases(leases)
        for lease in leases:
            began = parse_time(lease["spec"]["interval"]["start"])
            assert began >= start, f"a Lease started before the window:\n{detail}"
            assert lease["spec"]["paidByEnvelope"] == ENVELOPE, detail
            assert all(n.startswith("gpu-b-") for n in lease["spec"]["slice"]["nodes"]), detail
        assert opened - start < timedelta(seconds=25), f"started {opened - start} late"

        def released() -> None:
            st = get_json(stack, "-n", NS, RESERVATIONS, name).get("status") or {}
            assert st.get("state") == "Released", f"Reservation {name}: {st}"

        eventually(released, timeout=20)
    finally:
        teardown(stack, NS, [BUDGET])


def test_pre_activation_admission_binds_before_the_window(clean: LocalStack) -> None:
    stack = clean
    setup_namespace(stack, NS, "window:*")
    try:
        budget, start = _budget(EARLY_BUDGET, LEAD_SECONDS, allow_admission=True)
        apply_yaml(stack, budget)
        apply_yaml(stack, _run("early"))
        wait_running(stack, NS, "early", 16, timeout=20)
        assert utcnow() < start, "bound only after the window opened"
        leases = [x for x in all_run_leases(stack, NS, "early") if is_open(x)]
        detail = describe_leases(leases)
        for lease in leases:
            assert parse_time(lease["spec"]["interval"]["start"]) < start, detail
            assert lease["spec"]["paidByBudget"] == EARLY_BUDGET, detail
            assert lease["spec"]["paidByEnvelope"] == ENVELOPE, detail
            assert lease["spec"]["reason"] == "Start", detail
        status = run_status(stack, NS, "early")
        assert not status.get("pendingReservation"), status
        items = get_json(stack, "-n", NS, RESERVATIONS)["items"]
        assert not [r for r in items if r["spec"]["runRef"]["name"] == "early"], items
        time.sleep(2)
        assert run_status(stack, NS, "early")["phase"] == "Running"
    finally:
        teardown(stack, NS, [EARLY_BUDGET])
