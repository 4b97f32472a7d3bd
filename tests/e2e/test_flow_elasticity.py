"""Flow 6 — a malleable Run grows as capacity frees and shrinks when desired drops (SPEC §3
Elasticity and co-funding).

The owner ``elastic:team`` pays 96 GPUs in nv-a; the lender ``lender6`` (another organisation,
so not family) lends at most 32 GPUs of nv-b to ``elastic:*``. Three fixed 32-GPU filler Runs of
a third organisation hold 96 of nv-a's 128 GPUs, so the malleable Run (32..128 in groups of 32,
desired 128, may borrow 32) starts below its desired width: group 0 owned in nv-a, group 1
borrowed in nv-b. Deleting the fillers frees nv-a and the Run grows one 32-GPU step per freed
filler, each step a separate commit of ``Grow`` Leases, until it reaches 128. Lowering
``desiredTotalGPUs`` to 64 with ``kubectl patch`` shrinks it by whole groups, the borrowed group
first (even though it is not the highest index), then the highest index; the ended Leases close
``Shrink``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

from services.local.stack import LocalStack

from .conftest import RUNS, budget_status, by_name, describe_leases, eventually
from .helpers import (
    NV_A,
    NV_B,
    all_run_leases,
    apply_yaml,
    assert_nodes_schedulable,
    budget_manifest,
    closure,
    envelope,
    is_open,
    lease_gpus,
    run_manifest,
    run_status,
    running_pods,
    setup_namespace,
    teardown,
    wait_running,
)

NS = "e2e-elastic"
OWNER = "elastic:team"
LENDER = "lender6"
FILLER_OWNER = "filler6"
BUDGETS = ("e2e-elastic-own", "e2e-elastic-lender", "e2e-elastic-filler")
RUN = "elastic"
FILLERS = ("filler-1", "filler-2", "filler-3")


def _budgets() -> list[dict[str, Any]]:
    return [
        budget_manifest(BUDGETS[0], OWNER, [envelope("own-nv-a", NV_A, 96)]),
        budget_manifest(
            BUDGETS[1],
            LENDER,
            [
                envelope(
                    "lend-nv-b",
                    NV_B,
                    64,
                    lending={"allow": True, "to": ["elastic:*"], "maxConcurrency": 32},
                )
            ],
        ),
        budget_manifest(BUDGETS[2], FILLER_OWNER, [envelope("filler-nv-a", NV_A, 96)]),
    ]


def _elastic() -> dict[str, Any]:
    return run_manifest(
        RUN,
        NS,
        OWNER,
        128,
        group_gpus=32,
        runtime={"maxDuration": "2h"},
        malleable={
            "minTotalGPUs": 32,
            "maxTotalGPUs": 128,
            "stepGPUs": 32,
            "desiredTotalGPUs": 128,
        },
        funding={"allowBorrow": True, "maxBorrowGPUs": 32, "sponsors": [LENDER]},
    )


def _group(lease: dict[str, Any]) -> int:
    """The group index from ``compPath`` (``["GROUP[g]", "RANK[r]"]``)."""
    head = str(lease["spec"]["compPath"][0])
    assert head.startswith("GROUP[") and head.endswith("]"), lease["spec"]["compPath"]
    return int(head[len("GROUP[") : -1])


def _groups(leases: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for lease in leases:
        out[_group(lease)].append(lease)
    return dict(sorted(out.items()))


def _payer(leases: list[dict[str, Any]]) -> set[str]:
    return {x["spec"]["paidByOwner"] for x in leases}


def _width(stack: LocalStack) -> int:
    return int((run_status(stack, NS, RUN).get("width") or {}).get("allocated") or 0)


def _lent(stack: LocalStack, gpus: int) -> None:
    """The lender's Budget status shows ``gpus`` lent out (derived from the Leases)."""
    lender = budget_status(stack, BUDGETS[1])
    usage = by_name(lender.get("envelopes"), "lend-nv-b")["usage"]
    assert usage["borrowedOut"]["gpus"] == gpus, f"lender status: {lender}"


def _wait_width(stack: LocalStack, gpus: int, history: list[int], timeout: float) -> None:
    """Wait for width.allocated == gpus, recording every width seen on the way."""

    def check() -> None:
        width = _width(stack)
        if width and (not history or history[-1] != width):
            history.append(width)
        assert width == gpus, f"width.allocated is {width}, want {gpus}; seen {history}"

    eventually(check, timeout=timeout, interval=0.25)
    wait_running(stack, NS, RUN, gpus, timeout=15)


def test_malleable_run_grows_as_capacity_frees_and_shrinks_borrowed_first(
    clean: LocalStack,
) -> None:
    stack = clean
    assert_nodes_schedulable(stack, "gpu-a")  # the flow counts every GPU of nv-a
    setup_namespace(stack, NS, f"elastic:*,{FILLER_OWNER}")
    try:
        apply_yaml(stack, *_budgets())
        apply_yaml(
            stack,
            *(
                run_manifest(
                    name, NS, FILLER_OWNER, 32, group_gpus=32, runtime={"maxDuration": "2h"}
                )
                for name in FILLERS
            ),
        )
        for name in FILLERS:
            wait_running(stack, NS, name, 32)

        # --- start: only 32 GPUs of nv-a are free; the rest of the width is borrowed in nv-b ---
        apply_yaml(stack, _elastic())
        history: list[int] = []
        _wait_width(stack, 64, history, timeout=45)
        leases = [x for x in all_run_leases(stack, NS, RUN) if is_open(x)]
        detail = describe_leases(leases)
        groups = _groups(leases)
        assert len(groups) == 2, detail
        (g0, first), (g1, second) = groups.items()
        assert all(x["spec"]["reason"] == "Start" for x in leases), detail
        assert _payer(first) == {OWNER}, f"group {g0} should be owned:\n{detail}"
        assert _payer(second) == {LENDER}, f"group {g1} should be borrowed:\n{detail}"
        assert lease_gpus(first) == lease_gpus(second) == 32, detail
        status = run_status(stack, NS, RUN)
        assert status["width"] == {
            "min": 32,
            "max": 128,
            "desired": 128,
            "allocated": 64,
            "pending": 64,
        }, status
        assert status["funding"]["ownedGPUs"] == 32, status
        assert status["funding"]["borrowedGPUs"] == 32, status
        # Nothing frees: the Run stays at 64 (no overbooking of nv-a, no extra borrowing).
        time.sleep(3)
        assert _width(stack) == 64, run_status(stack, NS, RUN)

        # --- grow: each freed filler gives exactly one 32-GPU Grow step in nv-a -------------------
        for freed, target in ((FILLERS[0], 96), (FILLERS[1], 128)):
            began = time.monotonic()
            stack.kubectl("delete", RUNS, freed, "-n", NS, "--wait=false")
            # Capacity freeing must trigger growth, not only the 30 s periodic resync.
            _wait_width(stack, target, history, timeout=15)
            print(f"grew to {target} {time.monotonic() - began:.1f}s after deleting {freed}")
        assert history == [64, 96, 128], f"width must rise one step at a time: {history}"

        leases = all_run_leases(stack, NS, RUN)
        live = [x for x in leases if is_open(x)]
        detail = describe_leases(leases)
        assert len(live) == len(leases), f"no Lease of the Run closed while growing:\n{detail}"
        grown = [x for x in live if x["spec"]["reason"] == "Grow"]
        steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for lease in grown:
            steps[lease["spec"]["interval"]["start"]].append(lease)
        assert len(steps) == 2, f"two Grow commits (one start instant each):\n{detail}"
        for step in steps.values():
            assert lease_gpus(step) == 32, f"a Grow step is one stepGPUs group:\n{detail}"
            assert len({_group(x) for x in step}) == 1, detail
            assert _payer(step) == {OWNER}, f"growth in nv-a is owner-paid:\n{detail}"
            assert all(n.startswith("gpu-a-") for x in step for n in x["spec"]["slice"]["nodes"])
        groups = _groups(live)
        assert len(groups) == 4 and all(lease_gpus(g) == 32 for g in groups.values()), detail
        status = run_status(stack, NS, RUN)
        assert status["width"]["allocated"] == 128 and status["width"]["pending"] == 0, status
        assert status["funding"]["ownedGPUs"] == 96, status
        assert status["funding"]["borrowedGPUs"] == 32, status
        pods = running_pods(stack, NS, RUN, 16)
        assert {p["spec"]["nodeName"] for p in pods} == {
            n for x in live for n in x["spec"]["slice"]["nodes"]
        }, "pods are not on the leased nodes"
        eventually(lambda: _lent(stack, 32), timeout=20)

        # --- shrink: desired 128 → 64 ends the borrowed group first, then the highest index ------
        borrowed = {g for g, ls in groups.items() if _payer(ls) == {LENDER}}
        assert len(borrowed) == 1, detail
        highest_owned = max(g for g in groups if g not in borrowed)
        assert max(groups) not in borrowed, (
            f"the borrowed group should not be the highest:\n{detail}"
        )
        expect_released = borrowed | {highest_owned}
        expect_kept = set(groups) - expect_released
        stack.kubectl(
            "patch",
            RUNS,
            RUN,
            "-n",
            NS,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"malleable": {"desiredTotalGPUs": 64}}}),
        )
        _wait_width(stack, 64, history, timeout=30)
        leases = all_run_leases(stack, NS, RUN)
        detail = describe_leases(leases)
        live = [x for x in leases if is_open(x)]
        ended = [x for x in leases if not is_open(x)]
        assert set(_groups(live)) == expect_kept, f"kept {set(_groups(live))}:\n{detail}"
        assert set(_groups(ended)) == expect_released, f"released:\n{detail}"
        assert {closure(x) for x in ended} == {"Shrink"}, detail
        assert _payer(live) == {OWNER}, f"borrowed GPUs must go first:\n{detail}"

        def status_follows() -> None:
            status = run_status(stack, NS, RUN)
            assert status["phase"] == "Running", status
            assert status["width"]["desired"] == 64, status
            assert status["width"]["allocated"] == 64, status
            assert status["funding"]["ownedGPUs"] == 64, status
            assert status["funding"]["borrowedGPUs"] == 0, status

        eventually(status_follows, timeout=20)
        eventually(lambda: _lent(stack, 0), timeout=20)
        pods = running_pods(stack, NS, RUN, 8)
        assert {p["spec"]["nodeName"] for p in pods} == {
            n for x in live for n in x["spec"]["slice"]["nodes"]
        }, "pods of released groups remain, or kept ranks lost their pods"
        # Shrunk on purpose: it must not grow back while desired is 64.
        time.sleep(3)
        assert _width(stack) == 64, run_status(stack, NS, RUN)
    finally:
        teardown(stack, NS, BUDGETS)
