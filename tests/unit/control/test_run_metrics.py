"""The Run panels' figures: Runs by phase and flavor, and the wait from submission to Running."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from shared.control.run_metrics import PHASES, first_start_wait, phase_counts, run_flavor

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(
    phase: str | None = None, *, flavor: str = "H100-80GB", restarts: int = 0
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "r", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"resources": {"gpuType": flavor, "totalGPUs": 8}},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "restarts": restarts}
    return obj


def test_phase_counts_by_phase_and_flavor_with_unwritten_runs_pending() -> None:
    counts = phase_counts(
        [run(), run("Pending"), run("Running"), run("Running", flavor="B200"), run("Failed")]
    )
    assert counts == {
        ("Pending", "H100-80GB"): 2,
        ("Running", "H100-80GB"): 1,
        ("Running", "B200"): 1,
        ("Failed", "H100-80GB"): 1,
    }
    assert set(PHASES) == {"Pending", "Reserved", "Running", "Completed", "Failed"}


def test_flavor_of_a_run_without_resources_is_empty() -> None:
    assert run_flavor({"spec": {}}) == "" and run_flavor({}) == ""


def test_wait_is_measured_once_from_creation_to_the_first_running() -> None:
    now = T0 + timedelta(minutes=7)
    assert first_start_wait(run("Reserved"), {"phase": "Running", "restarts": 0}, now) == 420.0
    assert first_start_wait(run(), {"phase": "Running"}, now) == 420.0


def test_no_wait_for_other_writes_or_restarts() -> None:
    now = T0 + timedelta(minutes=7)
    assert first_start_wait(run("Running"), {"phase": "Running"}, now) is None
    assert first_start_wait(run("Pending"), {"phase": "Reserved"}, now) is None
    assert (
        first_start_wait(run("Pending", restarts=1), {"phase": "Running", "restarts": 1}, now)
        is None
    )
    no_stamp = run("Pending")
    del no_stamp["metadata"]["creationTimestamp"]
    assert first_start_wait(no_stamp, {"phase": "Running"}, now) is None
