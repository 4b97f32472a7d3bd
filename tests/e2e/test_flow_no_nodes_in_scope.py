"""A Run asking for a location where no node exists gets a typed answer, not a Reservation.

Its budget can pay, but the rack its selector names holds no node of its gpuType: no
Reservation could ever be placed there, so the forecaster declines (``UNRESERVABLE``) and
admission shows ``NoNodesInScope`` with the selector in the Run's message, holds nothing and
re-checks later (nodes may join).
"""

from __future__ import annotations

from services.local.stack import LocalStack

from .conftest import RESERVATIONS, eventually, get_json
from .helpers import (
    NV_A,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    condition,
    envelope,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
)

NS = "e2e-noscope"
OWNER = "e2e:noscope"
BUDGET = "e2e-noscope"


def test_a_run_for_a_location_without_nodes_is_pending_with_a_typed_reason(
    clean: LocalStack,
) -> None:
    stack = clean
    setup_namespace(stack, NS, OWNER)
    try:
        apply_yaml(stack, budget_manifest(BUDGET, OWNER, [envelope("a", NV_A, 64)]))
        nowhere = {**NV_A, "rack": "no-such-rack"}
        apply_yaml(stack, run_manifest("lost", NS, OWNER, 8, selector=nowhere))

        def declined() -> dict[str, object]:
            status = run_status(stack, NS, "lost")
            assert status.get("phase") == "Pending", status
            message = str(status.get("message"))
            assert message.startswith("NoNodesInScope: "), status
            assert "rack=no-such-rack" in message and "H100-80GB" in message, message
            scheduled = condition(status, "Scheduled")
            assert scheduled is not None and scheduled["reason"] == "NoNodesInScope", status
            return status

        eventually(declined, timeout=60)
        assert all_run_leases(stack, NS, "lost") == []
        assert get_json(stack, "-n", NS, RESERVATIONS)["items"] == []
    finally:
        teardown(stack, NS, (BUDGET,))
