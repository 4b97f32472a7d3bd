"""Flow 2 — co-funding through a sponsor, and a borrower the lending ACL refuses (SPEC §3 cover).

``run-cofunded-128`` (fixed 128 GPUs in groups of 32) is paid 96 GPUs by its owner's
``west-h100-nv-a`` and 32 by the vision lab's lending envelope: owned and borrowed Leases, and
``status.funding`` splits them with the sponsor. An owner outside ``lending.to`` (``org:ai:*``)
naming the same sponsor is refused with ``ACLDenied`` in the Run's message and holds nothing.
"""

from __future__ import annotations

import json
from typing import Any

from services.local.stack import LocalStack

from .conftest import (
    apply_sample,
    budget_status,
    by_name,
    create_namespace,
    describe_leases,
    eventually,
    get_json,
    run_leases,
    run_object,
    run_pods,
)

NS = "e2e-cofunded"
RUN = "run-cofunded-128"
OUTSIDER_NS = "e2e-acl"
OUTSIDER = "outsider-borrow"


def _outsider() -> dict[str, Any]:
    """A Run of ``acme:ml`` (another organisation, not matched by ``org:ai:*``) asking to borrow."""
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": OUTSIDER, "namespace": OUTSIDER_NS},
        "spec": {
            "owner": "acme:ml",
            "resources": {"gpuType": "H100-80GB", "totalGPUs": 32},
            "locality": {"groupGPUs": 32},
            "runtime": {"maxDuration": "1h"},
            "funding": {"allowBorrow": True, "maxBorrowGPUs": 32, "sponsors": ["org:vision"]},
        },
    }


def test_cofunded_run_splits_funding_with_its_sponsor(clean: LocalStack) -> None:
    stack = clean
    create_namespace(stack, NS, owners="org:ai:rai:sys")
    apply_sample(stack, "budgets/budget-west-h100.yaml")
    apply_sample(stack, "budgets/budget-vision-lending.yaml")
    apply_sample(stack, "runs/run-cofunded-128.yaml", NS)

    def running() -> dict[str, Any]:
        status = run_object(stack, NS, RUN).get("status") or {}
        assert status.get("phase") == "Running", f"Run status: {status}"
        assert (status.get("width") or {}).get("allocated") == 128, f"Run status: {status}"
        return status

    eventually(running, timeout=120)

    leases = run_leases(stack, NS, RUN)
    detail = describe_leases(leases)
    owned = [lease for lease in leases if lease["spec"]["paidByOwner"] == "org:ai:rai:sys"]
    borrowed = [lease for lease in leases if lease["spec"]["paidByOwner"] == "org:vision"]
    assert len(owned) + len(borrowed) == len(leases), f"an unexpected payer:\n{detail}"
    assert sum(x["spec"]["slice"]["gpus"] for x in owned) == 96, detail
    assert sum(x["spec"]["slice"]["gpus"] for x in borrowed) == 32, detail
    assert {x["spec"]["paidByEnvelope"] for x in owned} == {"west-h100-nv-a"}, detail
    assert {x["spec"]["paidByEnvelope"] for x in borrowed} == {"vision-h100-nv-b"}, detail
    assert {x["spec"]["paidByBudget"] for x in borrowed} == {"vision-lending"}, detail
    assert all(x["spec"]["owner"] == "org:ai:rai:sys" for x in leases), detail
    assert all(x["spec"]["slice"]["role"] == "Active" for x in leases), detail
    owned_nodes = {n for x in owned for n in x["spec"]["slice"]["nodes"]}
    borrowed_nodes = {n for x in borrowed for n in x["spec"]["slice"]["nodes"]}
    assert all(n.startswith("gpu-a-") for n in owned_nodes), detail
    assert all(n.startswith("gpu-b-") for n in borrowed_nodes), detail

    pods = run_pods(stack, NS, RUN)
    assert sorted(p["spec"].get("nodeName", "") for p in pods) == sorted(
        owned_nodes | borrowed_nodes
    ), "pods are not on the leased nodes"

    def funding_split() -> None:
        status = run_object(stack, NS, RUN)["status"]
        funding = status.get("funding") or {}
        assert funding.get("ownedGPUs") == 96, funding
        assert funding.get("sharedGPUs", 0) == 0, funding
        assert funding.get("borrowedGPUs") == 32, funding
        sponsors = funding.get("sponsors") or []
        assert [(s["owner"], s["kind"], s["gpus"]) for s in sponsors] == [
            ("org:vision", "sponsor", 32)
        ], funding
        assert status.get("width", {}).get("allocated") == 128, status

    eventually(funding_split, timeout=60)

    def lender_accounted() -> None:
        vision = budget_status(stack, "vision-lending")
        lent = by_name(vision.get("envelopes"), "vision-h100-nv-b")
        assert lent["usage"]["borrowedOut"]["gpus"] == 32, vision
        assert lent["usage"]["owned"]["gpus"] == 0, vision
        assert lent["headroom"]["concurrency"] == 32, vision

    eventually(lender_accounted, timeout=60)


def test_borrower_outside_the_acl_is_refused(clean: LocalStack) -> None:
    stack = clean
    # The namespace is authorised for acme:* so tenancy is not what refuses the Run.
    create_namespace(stack, OUTSIDER_NS, owners="acme:*")
    apply_sample(stack, "budgets/budget-west-h100.yaml")
    apply_sample(stack, "budgets/budget-vision-lending.yaml")
    stack.kubectl("apply", "-f", "-", input=json.dumps(_outsider()))

    def refused() -> dict[str, Any]:
        status = run_object(stack, OUTSIDER_NS, OUTSIDER).get("status") or {}
        assert "ACLDenied" in (status.get("message") or ""), f"Run status: {status}"
        return status

    status = eventually(refused, timeout=90)
    assert status.get("phase") != "Running", status
    assert run_leases(stack, OUTSIDER_NS, OUTSIDER) == [], "the refused Run holds Leases"
    assert run_pods(stack, OUTSIDER_NS, OUTSIDER) == [], "the refused Run has pods"
    leases = get_json(stack, "leases.rq.davidlangworthy.io")["items"]
    assert not [x for x in leases if x["spec"]["owner"] == "acme:ml"], describe_leases(leases)
