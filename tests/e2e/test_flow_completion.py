"""Flow 7 — how a gang ends (SPEC §3 Completion, walltime, deletion).

Every Run here is a 16-GPU gang of two 8-GPU ranks paid by ``done:team``'s nv-a envelope; its
pods are capacity holds under KWOK, ended the way a kubelet would end them (status phase patched
through the status subresource):

* every rank Succeeded → Leases close ``Completed`` and the Run is ``Completed``;
* a rank Failed → the gang's Leases close ``Fail``; a Run with a checkpoint and restarts left is
  requeued (``status.restarts`` 1, new Leases, new pods), one without a checkpoint ends ``Failed``;
* ``maxDuration`` passed → Leases close ``TimeLimit``;
* the Run deleted → Leases close ``Canceled``, its pods go, and the Leases stay in the ledger.
"""

from __future__ import annotations

import time
from typing import Any

from services.local.stack import LocalStack

from .conftest import LEASES, RUNS, describe_leases, eventually, get_json, run_pods
from .helpers import (
    NV_A,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    closure,
    condition,
    envelope,
    is_open,
    parse_time,
    run_manifest,
    run_status,
    running_pods,
    set_pod_phase,
    setup_namespace,
    teardown,
    wait_leases_closed,
    wait_phase,
    wait_running,
)

NS = "e2e-completion"
OWNER = "done:team"
BUDGET = "e2e-completion"


def _setup(stack: LocalStack) -> None:
    setup_namespace(stack, NS, "done:*")
    apply_yaml(stack, budget_manifest(BUDGET, OWNER, [envelope("done-nv-a", NV_A, 128)]))


def _gang(name: str, **spec: Any) -> dict[str, Any]:
    return run_manifest(name, NS, OWNER, 16, group_gpus=16, **spec)


def _closures(leases: list[dict[str, Any]]) -> set[str | None]:
    return {closure(x) for x in leases}


def test_all_ranks_succeeded_completes_the_run(clean: LocalStack) -> None:
    stack = clean
    _setup(stack)
    try:
        apply_yaml(stack, _gang("done-ok", runtime={"maxDuration": "1h"}))
        wait_running(stack, NS, "done-ok", 16)
        pods = running_pods(stack, NS, "done-ok", 2)
        leases = all_run_leases(stack, NS, "done-ok")

        # One rank finishing is not the gang finishing.
        set_pod_phase(stack, NS, pods[0]["metadata"]["name"], "Succeeded")
        time.sleep(2)
        status = run_status(stack, NS, "done-ok")
        assert status["phase"] == "Running", status
        assert all(is_open(x) for x in all_run_leases(stack, NS, "done-ok")), describe_leases(
            all_run_leases(stack, NS, "done-ok")
        )

        set_pod_phase(stack, NS, pods[1]["metadata"]["name"], "Succeeded")
        closed = wait_leases_closed(stack, NS, "done-ok", timeout=30)
        detail = describe_leases(closed)
        assert {x["metadata"]["name"] for x in closed} == {x["metadata"]["name"] for x in leases}
        assert _closures(closed) == {"Completed"}, detail
        for lease in closed:
            end = parse_time(lease["status"]["endTime"])
            assert end >= parse_time(lease["spec"]["interval"]["start"]), detail
        status = wait_phase(stack, NS, "done-ok", "Completed", timeout=30)
        cond = condition(status, "Completed")
        assert cond is not None and cond["status"] == "True", status
        assert status.get("restarts", 0) == 0, status
        assert status["width"]["allocated"] == 0, status
        assert status["funding"]["ownedGPUHours"] > 0, status
        # Terminated pods are kept (their logs stay readable) and are not restarted.
        phases = {
            p["metadata"]["name"]: p["status"]["phase"] for p in run_pods(stack, NS, "done-ok")
        }
        assert set(phases.values()) <= {"Succeeded"}, phases
    finally:
        teardown(stack, NS, [BUDGET])


def test_failed_rank_requeues_from_checkpoint_else_fails(clean: LocalStack) -> None:
    stack = clean
    _setup(stack)
    try:
        apply_yaml(
            stack,
            _gang("ckpt", runtime={"checkpoint": "10m", "maxDuration": "1h", "maxRestarts": 1}),
            _gang("no-ckpt", runtime={"maxDuration": "1h"}),
        )
        for name in ("ckpt", "no-ckpt"):
            wait_running(stack, NS, name, 16)
        first_pods = {
            name: {p["metadata"]["uid"] for p in running_pods(stack, NS, name, 2)}
            for name in ("ckpt", "no-ckpt")
        }
        first_leases = {x["metadata"]["name"] for x in all_run_leases(stack, NS, "ckpt")}

        for name in ("ckpt", "no-ckpt"):
            pod = sorted(run_pods(stack, NS, name), key=lambda p: p["metadata"]["name"])[-1]
            set_pod_phase(stack, NS, pod["metadata"]["name"], "Failed")

        # --- without a checkpoint: Fail, then Failed for good -----------------------------------
        closed = wait_leases_closed(stack, NS, "no-ckpt", timeout=30)
        assert _closures(closed) == {"Fail"}, describe_leases(closed)
        status = wait_phase(stack, NS, "no-ckpt", "Failed", timeout=30)
        cond = condition(status, "Failed")
        assert cond is not None and cond["reason"] == "Fail", status
        assert "no checkpoint" in status["message"], status
        assert status.get("restarts", 0) == 0, status

        # --- with a checkpoint: Fail, requeued, new Leases and new pods --------------------------
        def requeued() -> dict[str, Any]:
            status = run_status(stack, NS, "ckpt")
            assert status.get("restarts") == 1, status
            cond = condition(status, "Requeued")
            assert cond is not None and cond["reason"] == "Fail", status
            return status

        eventually(requeued, timeout=30)
        wait_running(stack, NS, "ckpt", 16, timeout=30)
        leases = all_run_leases(stack, NS, "ckpt")
        detail = describe_leases(leases)
        old = [x for x in leases if x["metadata"]["name"] in first_leases]
        new = [x for x in leases if x["metadata"]["name"] not in first_leases]
        assert len(old) == len(first_leases), detail
        assert _closures(old) == {"Fail"}, detail
        assert new and all(is_open(x) for x in new), detail
        assert all(x["spec"]["reason"] == "Start" for x in new), detail
        pods = running_pods(stack, NS, "ckpt", 2)
        assert not {p["metadata"]["uid"] for p in pods} & first_pods["ckpt"], "pods not recreated"
        for pod in pods:
            recorded = pod["metadata"]["annotations"].get("rq.davidlangworthy.io/leases", "")
            assert not any(name in recorded for name in first_leases), (
                f"{pod['metadata']['name']} still belongs to the first attempt: {recorded}"
            )

        # The failed gang without a checkpoint got nothing new.
        assert not [x for x in all_run_leases(stack, NS, "no-ckpt") if is_open(x)]
        assert run_status(stack, NS, "no-ckpt")["phase"] == "Failed"

        # --- the requeued attempt fails too: no restarts left → Failed ---------------------------
        set_pod_phase(stack, NS, pods[0]["metadata"]["name"], "Failed")
        status = wait_phase(stack, NS, "ckpt", "Failed", timeout=30)
        assert status.get("restarts") == 1, status
        assert "no restarts left" in status["message"], status
        leases = all_run_leases(stack, NS, "ckpt")
        assert not [x for x in leases if is_open(x)], describe_leases(leases)
        assert _closures(leases) == {"Fail"}, describe_leases(leases)
    finally:
        teardown(stack, NS, [BUDGET])


def test_walltime_exceeded_closes_time_limit(clean: LocalStack) -> None:
    stack = clean
    _setup(stack)
    try:
        apply_yaml(stack, _gang("short", runtime={"maxDuration": "10s"}))
        wait_running(stack, NS, "short", 16)
        running_pods(stack, NS, "short", 2)
        closed = wait_leases_closed(stack, NS, "short", timeout=40)
        detail = describe_leases(closed)
        assert _closures(closed) == {"TimeLimit"}, detail
        for lease in closed:
            held = parse_time(lease["status"]["endTime"]) - parse_time(
                lease["spec"]["interval"]["start"]
            )
            assert 10 <= held.total_seconds() < 25, f"held {held} for a 10s walltime:\n{detail}"
        status = wait_phase(stack, NS, "short", "Failed", timeout=30)
        cond = condition(status, "Failed")
        assert cond is not None and cond["reason"] == "TimeLimit", status

        def pods_stopped() -> None:
            live = [
                p["metadata"]["name"]
                for p in run_pods(stack, NS, "short")
                if p["status"].get("phase") not in ("Succeeded", "Failed")
                and not p["metadata"].get("deletionTimestamp")
            ]
            assert not live, f"pods still running past the walltime: {live}"

        eventually(pods_stopped, timeout=30)
    finally:
        teardown(stack, NS, [BUDGET])


def test_deleted_run_cancels_its_leases_and_keeps_them(clean: LocalStack) -> None:
    stack = clean
    _setup(stack)
    try:
        apply_yaml(stack, _gang("gone", runtime={"maxDuration": "1h"}))
        wait_running(stack, NS, "gone", 16)
        running_pods(stack, NS, "gone", 2)
        names = {x["metadata"]["name"] for x in all_run_leases(stack, NS, "gone")}
        assert names

        stack.kubectl("delete", RUNS, "gone", "-n", NS)

        def canceled() -> list[dict[str, Any]]:
            listed = get_json(stack, LEASES)["items"]
            mine = [x for x in listed if x["metadata"]["name"] in names]
            detail = describe_leases(mine)
            assert {x["metadata"]["name"] for x in mine} == names, f"Leases vanished:\n{detail}"
            assert _closures(mine) == {"Canceled"}, detail
            assert all(x["status"].get("endTime") for x in mine), detail
            return mine

        eventually(canceled, timeout=30)

        def pods_gone() -> None:
            left = [p["metadata"]["name"] for p in run_pods(stack, NS, "gone")]
            assert not left, f"pods of the deleted Run remain: {left}"

        eventually(pods_gone, timeout=30)
        # The ledger keeps them: the plain kubectl listing of the guide still shows them closed.
        table = stack.kubectl("get", LEASES, "-l", "rq.davidlangworthy.io/run=gone").stdout
        rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.strip()}
        assert set(rows) == names, table
        for row in rows.values():
            assert "true" in row and "Canceled" in row, f"not shown closed Canceled:\n{table}"
    finally:
        teardown(stack, NS, [BUDGET])
