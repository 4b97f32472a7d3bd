"""The family is the tree of Budgets that exist (SPEC §2), through ``kubectl apply`` end to end.

Two teams under a common prefix, ``fam:team:a`` (16 GPUs) and ``fam:team:b`` (64 GPUs, lending at
most 16 at once to ``fam:team:a`` only), with **no Budget for ``fam:team``**, are strangers:

* a Run of ``a`` needing more than its own 16 GPUs is refused (``InsufficientCapacity``) unless it
  borrows; borrowing from ``b`` starts it at 16 owned + 16 borrowed (sponsor Leases, lender's
  ``borrowedOut`` 16);
* with the lender's sub-cap then used up, and with a ``maxBorrowGPUs`` too small, further borrowing
  is ``BorrowLimit``; a third team ``fam:team:c`` outside ``b``'s ``lending.to`` gets
  ``ACLDenied``. None of the refused Runs holds a Lease.

Once a root Budget for ``fam:team`` is applied the three teams are siblings: the same Run shape
without any borrowing starts at 16 owned + 16 shared by ``b`` (family Leases). Finally, with nv-a
full, a Run of ``a`` whose own envelope (nv-a) funds it on paper starts in nv-b paid by the root:
the lazy cover's first offer is not enough for the packer, which asks for the rest.
"""

from __future__ import annotations

from typing import Any

from services.local.stack import LocalStack

from .conftest import BUDGETS, budget_status, by_name, describe_leases, eventually
from .helpers import (
    NV_A,
    NV_B,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    envelope,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
    wait_running,
)

NS = "e2e-family"
A, B, C, ROOT = "fam:team:a", "fam:team:b", "fam:team:c", "fam:team"
FILLER = "fam:filler"
"""A stranger (no Budget for ``fam``) whose Run fills nv-a."""
BUDGET_NAMES = ("fam-team-a", "fam-team-b", "fam-team-c", "fam-team", "fam-filler")
HOUR = {"maxDuration": "1h"}


def _borrowing(name: str, owner: str, gpus: int, max_borrow: int) -> dict[str, Any]:
    funding = {"allowBorrow": True, "maxBorrowGPUs": max_borrow, "sponsors": [B]}
    return run_manifest(name, NS, owner, gpus, group_gpus=8, runtime=HOUR, funding=funding)


def _refused(stack: LocalStack, run: str, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        status = run_status(stack, NS, run)
        assert reason in (status.get("message") or ""), f"{NS}/{run} status: {status}"
        return status

    status: dict[str, Any] = eventually(check, timeout=90)
    assert status.get("phase") != "Running", status
    assert all_run_leases(stack, NS, run) == [], f"refused Run {run} holds Leases"
    return status


def _payers(stack: LocalStack, run: str) -> dict[tuple[str, str], int]:
    """GPUs of the Run's open Leases by (paying owner, funding label)."""
    out: dict[tuple[str, str], int] = {}
    for lease in all_run_leases(stack, NS, run):
        if (lease.get("status") or {}).get("closed"):
            continue
        label = lease["metadata"]["labels"].get("rq.davidlangworthy.io/funding", "")
        key = (lease["spec"]["paidByOwner"], label)
        out[key] = out.get(key, 0) + lease["spec"]["slice"]["gpus"]
    return out


def test_teams_without_a_parent_budget_are_strangers_until_a_root_joins_them(
    clean: LocalStack,
) -> None:
    stack = clean
    setup_namespace(stack, NS, "fam:*")
    lend = {"allow": True, "to": [A], "maxConcurrency": 16}
    apply_yaml(
        stack,
        budget_manifest("fam-team-a", A, [envelope("a-nv-a", NV_A, 16)]),
        budget_manifest("fam-team-b", B, [envelope("b-nv-a", NV_A, 64, lending=lend)]),
        budget_manifest("fam-team-c", C, [envelope("c-nv-a", NV_A, 8)]),
    )
    try:
        # Borrowing within the lender's sub-cap and the Run's maxBorrowGPUs starts it.
        apply_yaml(stack, _borrowing("borrows", A, 32, max_borrow=16))
        status = wait_running(stack, NS, "borrows", 32, timeout=120)
        leases = all_run_leases(stack, NS, "borrows")
        assert _payers(stack, "borrows") == {(A, "owned"): 16, (B, "sponsor"): 16}, describe_leases(
            leases
        )

        def split() -> None:
            funding = run_status(stack, NS, "borrows").get("funding") or {}
            assert (funding.get("ownedGPUs"), funding.get("sharedGPUs", 0)) == (16, 0), funding
            assert funding.get("borrowedGPUs") == 16, funding
            sponsors = [(s["owner"], s["kind"], s["gpus"]) for s in funding.get("sponsors", [])]
            assert sponsors == [(B, "sponsor", 16)], funding

        eventually(split, timeout=60)

        def lent() -> None:
            env = by_name(budget_status(stack, "fam-team-b").get("envelopes"), "b-nv-a")
            assert env["usage"]["borrowedOut"]["gpus"] == 16, env
            assert env["usage"]["shared"]["gpus"] == 0, env

        eventually(lent, timeout=60)

        # Strangers do not share: without borrowing, a's 16 (all in use) are all it has.
        apply_yaml(stack, run_manifest("alone", NS, A, 16, group_gpus=8, runtime=HOUR))
        _refused(stack, "alone", "InsufficientCapacity")
        # The lender's sub-cap (16) is used up by "borrows": more borrowing is BorrowLimit…
        apply_yaml(stack, _borrowing("over-subcap", A, 16, max_borrow=16))
        status = _refused(stack, "over-subcap", "BorrowLimit")
        assert "lending sub-caps left fam-team-b/b-nv-a=0" in status["message"], status
        # …and so is a Run whose own maxBorrowGPUs is too small.
        apply_yaml(stack, _borrowing("small-borrow", A, 16, max_borrow=8))
        assert "maxBorrowGPUs 8" in _refused(stack, "small-borrow", "BorrowLimit")["message"]
        # A team outside b's lending.to is refused by the ACL, prefix or not.
        apply_yaml(stack, _borrowing("outsider", C, 16, max_borrow=16))
        _refused(stack, "outsider", "ACLDenied")

        teardown(stack, NS)
        # A root Budget for the prefix makes the three teams siblings: sharing needs no consent.
        apply_yaml(stack, budget_manifest("fam-team", ROOT, [envelope("root-nv-b", NV_B, 8)]))
        apply_yaml(stack, run_manifest("shares", NS, A, 32, group_gpus=8, runtime=HOUR))
        wait_running(stack, NS, "shares", 32, timeout=120)
        leases = all_run_leases(stack, NS, "shares")
        assert _payers(stack, "shares") == {(A, "owned"): 16, (B, "family"): 16}, describe_leases(
            leases
        )

        def shared() -> None:
            funding = run_status(stack, NS, "shares").get("funding") or {}
            assert (funding.get("ownedGPUs"), funding.get("sharedGPUs")) == (16, 16), funding
            assert funding.get("borrowedGPUs", 0) == 0, funding
            sponsors = [(s["owner"], s["kind"], s["gpus"]) for s in funding.get("sponsors", [])]
            assert sponsors == [(B, "family", 16)], funding

        eventually(shared, timeout=60)

        # Cover stops at a's own envelope (it funds 8 GPUs), but nv-a is full of a stranger's
        # Run: the packer asks for more offers, admission covers again with every offer, and
        # the Run starts in nv-b, paid by the parent's envelope — the plan the whole list gives.
        teardown(stack, NS)
        apply_yaml(stack, budget_manifest("fam-filler", FILLER, [envelope("f-nv-a", NV_A, 128)]))
        filler = run_manifest("filler", NS, FILLER, 128, group_gpus=8, selector=NV_A, runtime=HOUR)
        apply_yaml(stack, filler)
        wait_running(stack, NS, "filler", 128, timeout=120)
        apply_yaml(stack, run_manifest("spills", NS, A, 8, group_gpus=8, runtime=HOUR))
        wait_running(stack, NS, "spills", 8, timeout=120)
        leases = all_run_leases(stack, NS, "spills")
        assert _payers(stack, "spills") == {(ROOT, "family"): 8}, describe_leases(leases)
        nodes = {n for x in leases for n in x["spec"]["slice"]["nodes"]}
        assert all(n.startswith("gpu-b-") for n in nodes), describe_leases(leases)
    finally:
        teardown(stack, NS)
        stack.kubectl("delete", BUDGETS, *BUDGET_NAMES, "--ignore-not-found", "--wait=false")
