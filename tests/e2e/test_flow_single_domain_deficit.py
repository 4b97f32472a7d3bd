"""The deficit of a Run whose groups must share one domain is what its best domain lacks.

``fill-a`` holds 120 of nv-a's 128 GPUs (8 free), ``fill-b`` 80 of nv-b's (48 free). ``big`` asks
for 64 GPUs in groups of 8 with ``allowCrossGroupSpread: false``: the two domains have 56 free
GPUs together, 8 short, but no one domain holds it. The least that would make it fit is 16 more
GPUs in nv-b, and that is what its Reservation publishes (``deficitGPUs``, a scope naming nv-b,
a lottery for 16 GPUs among nv-b's Runs only, an intended slice in nv-b) and what
``kubectl runs plan`` shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from services.local.stack import LocalStack

from .conftest import REPO, RESERVATIONS, eventually, get_json
from .helpers import (
    NV_A,
    NV_B,
    apply_yaml,
    budget_manifest,
    envelope,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
    wait_running,
)

NS = "e2e-deficit"
OWNER = "e2edeficit:team"
"""Its own family root: no other test's Budget is a relative."""
BUDGET = "e2e-deficit"
WEST = {"region": "us-west"}
NV_B_SCOPE = {"kind": "Location", "flavor": "H100-80GB", "selector": NV_B}


def _reservation(stack: LocalStack, run: str) -> dict[str, Any]:
    """The Run's Reservation once the forecaster published its forecast."""

    def check() -> dict[str, Any]:
        items = [
            r
            for r in get_json(stack, "-n", NS, RESERVATIONS)["items"]
            if r["spec"]["runRef"]["name"] == run
        ]
        assert len(items) == 1, items
        status = items[0].get("status") or {}
        assert status.get("state") == "Pending" and status.get("forecast"), status
        return items[0]

    found: dict[str, Any] = eventually(check, timeout=60)
    return found


def _kubectl_runs(stack: LocalStack, *args: str) -> str:
    """``kubectl runs …`` as a user runs it: kubectl finds the plugin on PATH."""
    env = stack.env()
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env["PATH"]))
    env["COLUMNS"] = "200"
    done = subprocess.run(
        [str(stack.control_plane.bin_dir / "kubectl"), "runs", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_single_domain_run_shows_what_its_best_domain_lacks(clean: LocalStack) -> None:
    stack = clean
    setup_namespace(stack, NS, OWNER)
    try:
        apply_yaml(stack, budget_manifest(BUDGET, OWNER, [envelope("west", WEST, 400)]))
        apply_yaml(stack, run_manifest("fill-a", NS, OWNER, 120, group_gpus=8, selector=NV_A))
        wait_running(stack, NS, "fill-a", 120)
        apply_yaml(stack, run_manifest("fill-b", NS, OWNER, 80, group_gpus=8, selector=NV_B))
        wait_running(stack, NS, "fill-b", 80)

        big = run_manifest("big", NS, OWNER, 64, group_gpus=8)
        big["spec"]["locality"]["allowCrossGroupSpread"] = False
        apply_yaml(stack, big)

        reservation = _reservation(stack, "big")
        # Nothing bounds the fillers, so the ETA is conservative and the claim lies in nv-b.
        assert reservation["spec"]["intendedSlice"]["domain"] == NV_B, reservation["spec"]
        status = (reservation.get("status") or {})["forecast"]
        assert status["deficitGPUs"] == 16, status
        assert status["scope"] == NV_B_SCOPE, status
        assert status["conflictSet"] == [f"{NS}/fill-b"], status
        lottery = [r for r in status["remedies"] if r["action"] == "Lottery"]
        assert [r["gpus"] for r in lottery] == [16], status["remedies"]
        assert eventually(lambda: _phase(stack), timeout=30) == "Reserved"

        plan = _kubectl_runs(stack, "plan", "big", "-n", NS)
        assert "16 GPUs in Location H100-80GB us-west/gpu-b/nv-b" in plan, plan
        assert "seeded lottery for 16 GPUs" in plan, plan
    finally:
        teardown(stack, NS, (BUDGET,))


def _phase(stack: LocalStack) -> str:
    phase = str(run_status(stack, NS, "big").get("phase"))
    assert phase == "Reserved", phase
    return phase
