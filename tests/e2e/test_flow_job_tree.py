"""Flow 9 — a job tree with ``spec.after`` (SPEC §2 Run).

``train`` waits for both ``prep-a`` and ``prep-b``: it stays Pending with condition
``WaitingForUpstream`` and holds nothing while either upstream runs, and starts once both have
Completed (all their ranks Succeeded). ``report`` waits for ``broken``; when ``broken``'s rank
fails (no checkpoint, so it ends Failed) ``report`` ends Failed with ``UpstreamFailed``, never
having held a GPU. The whole tree is submitted as one ``kubectl apply`` of a YAML stream.
"""

from __future__ import annotations

import time
from typing import Any

from services.local.stack import LocalStack

from .conftest import eventually, run_pods
from .helpers import (
    NV_A,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    condition,
    envelope,
    finish_pods,
    run_manifest,
    run_status,
    running_pods,
    set_pod_phase,
    setup_namespace,
    teardown,
    wait_phase,
    wait_running,
)

NS = "e2e-tree"
OWNER = "tree:team"
BUDGET = "e2e-tree"


def _run(name: str, **spec: Any) -> dict[str, Any]:
    return run_manifest(name, NS, OWNER, 8, runtime={"maxDuration": "1h"}, **spec)


def _setup(stack: LocalStack) -> None:
    setup_namespace(stack, NS, "tree:*")
    apply_yaml(stack, budget_manifest(BUDGET, OWNER, [envelope("tree-nv-a", NV_A, 64)]))


def _assert_waiting(stack: LocalStack, name: str, on: list[str]) -> dict[str, Any]:
    status = run_status(stack, NS, name)
    assert status.get("phase") == "Pending", f"{name} status: {status}"
    cond = condition(status, "WaitingForUpstream")
    assert cond is not None and cond["status"] == "True", f"{name} status: {status}"
    for upstream in on:
        assert upstream in status.get("message", ""), f"{name} should name {upstream}: {status}"
    assert not all_run_leases(stack, NS, name), f"{name} holds Leases while waiting"
    assert not run_pods(stack, NS, name), f"{name} has pods while waiting"
    return status


def test_run_waits_for_all_upstreams_then_starts(clean: LocalStack) -> None:
    stack = clean
    _setup(stack)
    try:
        apply_yaml(
            stack,
            _run("train", after=["prep-a", "prep-b"]),
            _run("prep-a"),
            _run("prep-b"),
        )
        for name in ("prep-a", "prep-b"):
            wait_running(stack, NS, name, 8)
        eventually(lambda: _assert_waiting(stack, "train", ["prep-a", "prep-b"]), timeout=20)

        # prep-a completes; train keeps waiting for prep-b alone.
        running_pods(stack, NS, "prep-a", 1)
        finish_pods(stack, NS, "prep-a", "Succeeded")
        wait_phase(stack, NS, "prep-a", "Completed", timeout=30)

        def waits_on_b_only() -> None:
            status = _assert_waiting(stack, "train", ["prep-b"])
            assert "prep-a" not in status["message"], status

        eventually(waits_on_b_only, timeout=20)
        time.sleep(3)
        _assert_waiting(stack, "train", ["prep-b"])

        # prep-b completes too: train starts.
        running_pods(stack, NS, "prep-b", 1)
        finish_pods(stack, NS, "prep-b", "Succeeded")
        wait_phase(stack, NS, "prep-b", "Completed", timeout=30)
        status = wait_running(stack, NS, "train", 8, timeout=30)
        cond = condition(status, "WaitingForUpstream")
        assert cond is None or cond["status"] != "True", status
        running_pods(stack, NS, "train", 1)
    finally:
        teardown(stack, NS, [BUDGET])


def test_failed_upstream_fails_the_downstream(clean: LocalStack) -> None:
    stack = clean
    _setup(stack)
    try:
        apply_yaml(stack, _run("broken"), _run("report", after=["broken"]))
        wait_running(stack, NS, "broken", 8)
        eventually(lambda: _assert_waiting(stack, "report", ["broken"]), timeout=20)

        pod = running_pods(stack, NS, "broken", 1)[0]
        set_pod_phase(stack, NS, pod["metadata"]["name"], "Failed")
        wait_phase(stack, NS, "broken", "Failed", timeout=30)

        status = wait_phase(stack, NS, "report", "Failed", timeout=30)
        cond = condition(status, "Failed")
        assert cond is not None and cond["reason"] == "UpstreamFailed", status
        assert "UpstreamFailed" in status["message"] and "broken" in status["message"], status
        assert not all_run_leases(stack, NS, "report"), "report held Leases"
        assert not run_pods(stack, NS, "report"), "report has pods"
    finally:
        teardown(stack, NS, [BUDGET])
