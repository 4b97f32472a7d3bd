"""Shared helpers for the end-to-end flows: manifests as YAML, pods, leases, waits, clean-up.

Everything here drives the real stack through ``kubectl`` (the ``stack`` fixture of
``conftest.py``): manifests are rendered as YAML and ``kubectl apply``-ed, KWOK pods are ended by
patching their status subresource, and every wait polls the API server with a timeout whose
message says what was expected and what was seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from services.local.stack import LocalStack

from .conftest import (
    BUDGETS,
    GROUP,
    LEASES,
    RESERVATIONS,
    RUNS,
    create_namespace,
    describe_leases,
    eventually,
    get_json,
    run_object,
    run_pods,
)

API_VERSION = f"{GROUP}/v1"
FLAVOR = "H100-80GB"
NV_A = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"}
NV_B = {"region": "us-west", "cluster": "gpu-b", "fabric.domain": "nv-b"}


# -- time ------------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(at: datetime) -> str:
    """Whole-second RFC 3339 UTC with ``Z``."""
    return at.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime:
    assert text, "expected an RFC 3339 timestamp, got nothing"
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def future(seconds: float) -> datetime:
    """Now plus ``seconds``, truncated to whole seconds."""
    return (utcnow() + timedelta(seconds=seconds)).replace(microsecond=0)


# -- manifests -------------------------------------------------------------------------------------


def envelope(
    name: str,
    selector: Mapping[str, str],
    concurrency: int,
    **extra: Any,
) -> dict[str, Any]:
    """One Budget envelope of the fleet's flavor; ``extra`` holds camelCase fields as-is."""
    return {
        "name": name,
        "flavor": FLAVOR,
        "selector": dict(selector),
        "concurrency": concurrency,
        **extra,
    }


def budget_manifest(
    name: str, owner: str, envelopes: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Budget",
        "metadata": {"name": name},
        "spec": {"owner": owner, "envelopes": [dict(e) for e in envelopes]},
    }


def run_manifest(
    name: str,
    namespace: str,
    owner: str,
    gpus: int,
    *,
    group_gpus: int | None = None,
    selector: Mapping[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A Run without a template (its pods are capacity holds under KWOK); ``spec`` holds extra
    camelCase spec fields as-is (``runtime``, ``malleable``, ``funding``, ``after`` …)."""
    locality: dict[str, Any] = {}
    if group_gpus is not None:
        locality["groupGPUs"] = group_gpus
    if selector is not None:
        locality["selector"] = dict(selector)
    body: dict[str, Any] = {
        "owner": owner,
        "resources": {"gpuType": FLAVOR, "totalGPUs": gpus},
        **spec,
    }
    if locality:
        body["locality"] = locality
    return {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def apply_yaml(stack: LocalStack, *objects: Mapping[str, Any]) -> str:
    """``kubectl apply -f -`` of the objects as one YAML stream; returns the YAML applied."""
    text = yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False)
    stack.kubectl("apply", "-f", "-", input=text)
    return text


def setup_namespace(stack: LocalStack, namespace: str, owners: str) -> None:
    """A namespace authorised (annotation ``rq.davidlangworthy.io/owners``) for ``owners``."""
    create_namespace(stack, namespace, owners=owners)


# -- reading state ---------------------------------------------------------------------------------


def run_status(stack: LocalStack, namespace: str, run: str) -> dict[str, Any]:
    status: dict[str, Any] = run_object(stack, namespace, run).get("status") or {}
    return status


def condition(status: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def all_run_leases(stack: LocalStack, namespace: str, run: str) -> list[dict[str, Any]]:
    """Every Jobtree Lease of the Run, open and closed, by name."""
    items: list[dict[str, Any]] = get_json(
        stack, LEASES, "-l", f"{GROUP}/run={run},{GROUP}/namespace={namespace}"
    )["items"]
    return sorted(items, key=lambda x: x["metadata"]["name"])


def is_open(lease: Mapping[str, Any]) -> bool:
    return not (lease.get("status") or {}).get("closed")


def closure(lease: Mapping[str, Any]) -> str | None:
    reason = (lease.get("status") or {}).get("closureReason")
    return str(reason) if reason is not None else None


def lease_gpus(leases: Iterable[Mapping[str, Any]]) -> int:
    return sum(int(x["spec"]["slice"]["gpus"]) for x in leases)


def pods_by_phase(stack: LocalStack, namespace: str, run: str) -> dict[str, str]:
    return {
        p["metadata"]["name"]: str((p.get("status") or {}).get("phase"))
        for p in run_pods(stack, namespace, run)
    }


def log_lines(stack: LocalStack, service: str, *needles: str) -> list[str]:
    """Lines of a service's log containing every needle (for failure messages)."""
    path = stack.services.log_path(service)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if all(n in line for n in needles)]


# -- acting ----------------------------------------------------------------------------------------


def set_pod_phase(stack: LocalStack, namespace: str, pod: str, phase: str) -> None:
    """End a KWOK pod as its kubelet would: patch ``status.phase`` through the subresource."""
    stack.kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": phase}}),
    )


def running_pods(stack: LocalStack, namespace: str, run: str, count: int) -> list[dict[str, Any]]:
    """Wait until the Run has exactly ``count`` pods, all Running under KWOK."""

    def check() -> list[dict[str, Any]]:
        pods = [
            p for p in run_pods(stack, namespace, run) if not p["metadata"].get("deletionTimestamp")
        ]
        phases = {p["metadata"]["name"]: (p.get("status") or {}).get("phase") for p in pods}
        assert len(pods) == count, f"{namespace}/{run}: want {count} pods, have {phases}"
        assert set(phases.values()) == {"Running"}, f"{namespace}/{run} pod phases: {phases}"
        return pods

    result: list[dict[str, Any]] = eventually(check, timeout=60)
    return result


def finish_pods(stack: LocalStack, namespace: str, run: str, phase: str = "Succeeded") -> list[str]:
    """Set every live pod of the Run to ``phase``; returns the pod names."""
    names = [
        p["metadata"]["name"]
        for p in run_pods(stack, namespace, run)
        if not p["metadata"].get("deletionTimestamp")
    ]
    assert names, f"{namespace}/{run} has no pods to end"
    for name in names:
        set_pod_phase(stack, namespace, name, phase)
    return names


def wait_phase(
    stack: LocalStack, namespace: str, run: str, phase: str, *, timeout: float = 60.0
) -> dict[str, Any]:
    """Wait for ``status.phase == phase``; returns the status."""

    def check() -> dict[str, Any]:
        status = run_status(stack, namespace, run)
        assert status.get("phase") == phase, (
            f"{namespace}/{run}: want phase {phase}, status is {json.dumps(status, indent=1)}"
        )
        return status

    result: dict[str, Any] = eventually(check, timeout=timeout)
    return result


def wait_running(
    stack: LocalStack, namespace: str, run: str, gpus: int, *, timeout: float = 60.0
) -> dict[str, Any]:
    """Wait for phase Running with ``width.allocated == gpus`` and as many GPUs of open Leases."""

    def check() -> dict[str, Any]:
        status = run_status(stack, namespace, run)
        assert status.get("phase") == "Running", f"{namespace}/{run} status: {status}"
        allocated = (status.get("width") or {}).get("allocated")
        assert allocated == gpus, f"{namespace}/{run}: allocated {allocated} != {gpus}: {status}"
        live = [x for x in all_run_leases(stack, namespace, run) if is_open(x)]
        assert lease_gpus(live) == gpus, (
            f"{namespace}/{run}: open leases hold {lease_gpus(live)} GPUs, want {gpus}:\n"
            + describe_leases(live)
        )
        return status

    result: dict[str, Any] = eventually(check, timeout=timeout)
    return result


def wait_leases_closed(
    stack: LocalStack, namespace: str, run: str, *, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Wait until the Run has Leases and none is open; returns them all."""

    def check() -> list[dict[str, Any]]:
        leases = all_run_leases(stack, namespace, run)
        assert leases, f"{namespace}/{run} has no Leases at all"
        left = [x for x in leases if is_open(x)]
        assert not left, f"{namespace}/{run} Leases still open:\n" + describe_leases(left)
        return leases

    result: list[dict[str, Any]] = eventually(check, timeout=timeout)
    return result


def teardown(stack: LocalStack, namespace: str, budgets: Iterable[str] = ()) -> None:
    """Delete the namespace's Runs and Reservations, wait for their Leases to close, then
    delete the Budgets: the next test starts from an idle fleet."""
    stack.kubectl("delete", RESERVATIONS, "--all", "-n", namespace, "--wait=false", check=False)
    stack.kubectl("delete", RUNS, "--all", "-n", namespace, "--wait=false", check=False)

    def idle() -> None:
        runs = get_json(stack, "-n", namespace, RUNS)["items"]
        assert not runs, f"Runs of {namespace} not deleted: {[r['metadata']['name'] for r in runs]}"
        items = get_json(stack, LEASES, "-l", f"{GROUP}/namespace={namespace}")["items"]
        left = [x for x in items if is_open(x)]
        assert not left, f"Leases of {namespace} still open:\n" + describe_leases(left)

    eventually(idle, timeout=60)
    names = list(budgets)
    if names:
        stack.kubectl("delete", BUDGETS, *names, "--ignore-not-found", "--wait=false")


def assert_nodes_schedulable(stack: LocalStack, prefix: str, count: int = 16) -> None:
    """Precondition of capacity-exact flows: ``<prefix>-01..count`` exist, Ready, uncordoned
    (a failure here means an earlier test left the fleet damaged, not a bug of the flow)."""
    nodes = {n["metadata"]["name"]: n for n in get_json(stack, "nodes")["items"]}
    bad = []
    for i in range(1, count + 1):
        name = f"{prefix}-{i:02d}"
        node = nodes.get(name)
        if node is None:
            bad.append(f"{name}: missing")
            continue
        ready = [
            c.get("status")
            for c in (node.get("status") or {}).get("conditions") or []
            if c.get("type") == "Ready"
        ]
        if ready != ["True"] or (node.get("spec") or {}).get("unschedulable"):
            bad.append(f"{name}: Ready={ready} unschedulable={node['spec'].get('unschedulable')}")
    assert not bad, "fleet not intact before the test: " + "; ".join(bad)
