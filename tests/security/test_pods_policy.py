"""Attack: a tenant's Run whose pod template asks for the node — privileged containers, the host's
filesystem, its PID namespace, another workload's service account, GPUs the Lease does not pay for
(an init container's), or a template so large every rank's pod costs the binder megabytes. Each
is refused with the field path named: by the webhook, by admission's
reconcile when the webhook is bypassed (Run Failed, reason PodPolicy), and by the binder when a
commit for such a Run reaches it anyway; and no Lease or Pod is ever created for it.

A harmless Run beside them binds, with its Leases and Pods: the stack would have started the
attack Runs had nothing refused them.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from shared.bus import COMMIT, CommitReply
from shared.control.pod_policy import template_bytes
from shared.engine.model import LeaseReason
from tests.security.conftest import (
    BASELINE,
    BUDGET,
    DIRECT,
    HOOKED,
    OWNER,
    RESTRICTED,
    SecureStack,
    leases_of,
    pods_of,
    run_manifest,
    run_status,
    try_apply,
)
from tests.service import helpers as h

pytestmark = pytest.mark.kube

S = "spec.template.spec"


def template(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"containers": [{"name": "main", "image": "busybox"}]}
    base.update(spec)
    return {"spec": base}


BIG = {"metadata": {"annotations": {"blob": "x" * 70_000}}, **template()}
"""Costs the binder 70 kB per rank: a gang of 512 ranks would be 35 MB of pods."""
ATTACKS: dict[str, tuple[dict[str, Any], str]] = {
    "privileged": (
        template(
            containers=[
                {"name": "main", "image": "busybox", "securityContext": {"privileged": True}}
            ]
        ),
        f"{S}.containers[0].securityContext.privileged is true",
    ),
    "hostpath": (
        template(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
        f"{S}.volumes[0].hostPath mounts the node's filesystem",
    ),
    "hostpid": (template(hostPID=True), f"{S}.hostPID is true"),
    "service-account": (
        template(serviceAccountName="jobtree-binder"),
        f"{S}.serviceAccountName is 'jobtree-binder', not an allowed service account",
    ),
    "init-gpus": (
        template(
            initContainers=[
                {
                    "name": "grab",
                    "image": "busybox",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ]
        ),
        f"{S}.initContainers[0].resources.limits[nvidia.com/gpu] requests a device",
    ),
    "oversized": (
        BIG,
        f"spec.template is {template_bytes(BIG)} bytes, more than the limit of 65536 bytes "
        "(--max-template-bytes)",
    ),
}


def assert_untouched(stack: SecureStack, namespace: str, run: str) -> None:
    assert leases_of(stack, namespace, run) == []
    assert pods_of(stack, namespace, run) == []


def test_a_harmless_run_binds(secure: SecureStack) -> None:
    done = try_apply(secure, run_manifest(DIRECT, "harmless", template()))
    assert done.returncode == 0, done.stderr
    run_status(secure, DIRECT, "harmless", "Running")
    assert len(leases_of(secure, DIRECT, "harmless")) == 1
    pods = pods_of(secure, DIRECT, "harmless")
    assert [p["spec"]["nodeName"] for p in pods] == [
        leases_of(secure, DIRECT, "harmless")[0]["spec"]["slice"]["nodes"][0]
    ]


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_webhook_refuses_with_the_field_path(secure: SecureStack, attack: str) -> None:
    tmpl, refusal = ATTACKS[attack]
    name = f"hooked-{attack}"
    done = try_apply(secure, run_manifest(HOOKED, name, tmpl))
    assert done.returncode != 0, done.stdout
    assert (
        'admission webhook "runs.validate.rq.davidlangworthy.io" denied the request' in done.stderr
    )
    assert f"PodPolicy: {refusal}" in done.stderr
    missing = secure.kubectl("get", h.RUNS, "-n", HOOKED, name, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr
    assert_untouched(secure, HOOKED, name)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_reconcile_fails_a_run_that_bypassed_the_webhook(
    secure: SecureStack, attack: str
) -> None:
    tmpl, refusal = ATTACKS[attack]
    name = f"direct-{attack}"
    done = try_apply(secure, run_manifest(DIRECT, name, tmpl))
    assert done.returncode == 0, done.stderr  # no webhook here: the API server stores it
    status = run_status(secure, DIRECT, name, "Failed")
    assert status["message"].startswith("PodPolicy: ") and refusal in status["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodPolicy"
    assert_untouched(secure, DIRECT, name)


async def test_the_binder_refuses_a_commit_for_such_a_run(secure: SecureStack) -> None:
    """The commit admission would have sent, sent straight to the binder: refused, nothing
    written. (The Run exists; admission already failed it, the binder checks on its own.)"""
    name = "direct-privileged"
    tmpl, refusal = ATTACKS["privileged"]
    if secure.kubectl("get", h.RUNS, "-n", DIRECT, name, check=False).returncode != 0:
        assert try_apply(secure, run_manifest(DIRECT, name, tmpl)).returncode == 0
    run_obj = h.get_json(secure.kube, h.RUNS, "-n", DIRECT, name)
    busy = {
        le["spec"]["slice"]["nodes"][0]
        for le in h.get_json(secure.kube, h.LEASES)["items"]
        if not (le.get("status") or {}).get("closed")
    }
    free = [n for n in secure.nodes if n not in busy]
    assert free, "no free test node"
    intent = h.bind_intent(
        run_obj,
        [(free[0], 8)],
        envelope=f"{BUDGET}/main",
        owner=OWNER,
        domain=("sec-r", "sec-c", "sec-f"),
        reason=LeaseReason.START,
    )
    commit = msgspec.structs.replace(
        h.commit_request(run_obj, intent, reason="Start"), budget_of={f"{BUDGET}/main": BUDGET}
    )
    async with h.bus_client(secure.nats, "security-attacker") as client:
        reply = await client.request(COMMIT, commit, timeout=30)
    assert isinstance(reply, CommitReply)
    assert not reply.ok
    assert reply.conflict == f"PodPolicy: {S}.containers[0].securityContext.privileged is true"
    assert refusal in (reply.conflict or "")
    assert_untouched(secure, DIRECT, name)


def test_podsecurity_restricted_refuses_the_capacity_hold_whole(secure: SecureStack) -> None:
    """docs/security.md: the hold pod (no template) passes ``baseline`` but not ``restricted``,
    and the binder's dry run refuses such a bind whole: no Lease, no Pod."""
    done = try_apply(secure, run_manifest(RESTRICTED, "hold", None))
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 60
    while True:
        status = h.get_json(secure.kube, h.RUNS, "-n", RESTRICTED, "hold").get("status") or {}
        if "InvalidPod" in str(status.get("message")) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status.get("phase") == "Pending", status
    assert (
        "InvalidPod" in status["message"]
        and 'violates PodSecurity "restricted' in status["message"]
    )
    assert_untouched(secure, RESTRICTED, "hold")


def test_podsecurity_baseline_admits_the_capacity_hold(secure: SecureStack) -> None:
    done = try_apply(secure, run_manifest(BASELINE, "hold", None))
    assert done.returncode == 0, done.stderr
    run_status(secure, BASELINE, "hold", "Running")
    assert len(pods_of(secure, BASELINE, "hold")) == 1
