"""Capacity from the truth of the node (SPEC §1): Jobtree shares its nodes with other pods.

Each test adds its own KWOK nodes in a fabric domain of their own (cluster ``cap``), a Budget
whose envelope covers exactly that domain, and the pods a platform would run beside Jobtree
(created with ``kubectl apply`` and bound by ``nodeName``, as a DaemonSet controller or a
researcher's notebook would leave them). The Runs are applied with ``kubectl apply`` and go
through the real services; the assertions read the Leases and pods the binder wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.local.stack import LocalStack
from shared.localenv.fleet import node_manifest

from .conftest import eventually, get_json, run_pods
from .helpers import (
    FLAVOR,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    condition,
    envelope,
    is_open,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
    wait_phase,
)

NS = "e2e-capacity"
OWNER = "e2e:capacity"
BUDGET = "e2e-capacity"
PAUSE = "registry.k8s.io/pause:3.10"

Fleet = Callable[..., list[str]]


def _where(domain: str) -> dict[str, str]:
    return {"region": "us-west", "cluster": "cap", "fabric.domain": domain}


@pytest.fixture
def fleet(clean: LocalStack) -> Iterator[Fleet]:
    """``fleet(domain, count, memory=…)`` adds Ready KWOK nodes ``<domain>-01…``; the Runs, pods,
    Budget and nodes are removed afterwards."""
    stack = clean
    setup_namespace(stack, NS, OWNER)
    made: list[str] = []

    def add(domain: str, count: int, **allocatable: str) -> list[str]:
        labels = {**_where(domain), "rack": "r1", "gpu.flavor": FLAVOR}
        names = [f"{domain}-{i:02d}" for i in range(1, count + 1)]
        for name in names:
            manifest = node_manifest(name, labels)
            for key, value in allocatable.items():
                resource = key.replace("_", "-")
                manifest["status"]["allocatable"][resource] = value
                manifest["status"]["capacity"][resource] = value
            stack.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        made.extend(names)
        stack.kubectl(
            "wait", "--for=condition=Ready", "--timeout=60s", *(f"node/{n}" for n in names)
        )
        apply_yaml(stack, budget_manifest(BUDGET, OWNER, [envelope("cap", _where(domain), 64)]))
        return names

    yield add
    teardown(stack, NS, (BUDGET,))
    stack.kubectl("delete", "pods", "--all", "-n", NS, "--grace-period=0", "--force", check=False)
    if made:
        stack.kubectl("delete", "node", *made, "--ignore-not-found", "--wait=false")


def other_pod(name: str, node: str, **requests: str) -> dict[str, Any]:
    """A pod Jobtree did not create, bound to ``node`` (``nvidia_com_gpu`` → ``nvidia.com/gpu``)."""
    wanted = {k.replace("_com_", ".com/").replace("_", "-"): v for k, v in requests.items()}
    limits = {k: v for k, v in wanted.items() if "/" in k}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "not-jobtree"}},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "c", "image": PAUSE, "resources": {"requests": wanted, "limits": limits}}
            ],
        },
    }


def start_others(stack: LocalStack, *pods: dict[str, Any]) -> None:
    """Apply the pods and wait until KWOK runs them (their watch events are long delivered)."""
    apply_yaml(stack, *pods)

    def running() -> None:
        items = get_json(stack, "pods", "-n", NS, "-l", "app=not-jobtree")["items"]
        phases = {p["metadata"]["name"]: (p.get("status") or {}).get("phase") for p in items}
        assert len(items) >= len(pods) and set(phases.values()) == {"Running"}, phases

    eventually(running, timeout=60)


def template(**requests: str) -> dict[str, Any]:
    container = {"name": "train", "image": PAUSE, "resources": {"requests": dict(requests)}}
    return {"spec": {"containers": [container]}}


def capacity_run(name: str, domain: str, gpus: int, **spec: Any) -> dict[str, Any]:
    return run_manifest(name, NS, OWNER, gpus, selector=_where(domain), **spec)


def placed(stack: LocalStack, run: str) -> dict[str, int]:
    """Node → GPUs of the Run's open Leases, once it is Running with pods on those nodes."""
    wait_phase(stack, NS, run, "Running", timeout=90)
    leases = [x for x in all_run_leases(stack, NS, run) if is_open(x)]
    out: dict[str, int] = {}
    for lease in leases:
        node = lease["spec"]["slice"]["nodes"][0]
        out[node] = out.get(node, 0) + int(lease["spec"]["slice"]["gpus"])

    def pods_bound() -> None:
        nodes = sorted(p["spec"].get("nodeName") for p in run_pods(stack, NS, run))
        assert nodes == sorted(out), (nodes, out)

    eventually(pods_bound, timeout=60)
    return out


def held_back(stack: LocalStack, run: str) -> dict[str, Any]:
    """The Run waits (Reserved, or Pending while the forecast answers) and holds no GPUs."""

    def waiting() -> dict[str, Any]:
        status = run_status(stack, NS, run)
        assert status.get("phase") in ("Reserved", "Pending"), status
        scheduled = condition(status, "Scheduled")
        assert scheduled is not None and scheduled["status"] == "False", status
        return status

    status: dict[str, Any] = eventually(waiting, timeout=60)
    assert not [x for x in all_run_leases(stack, NS, run) if is_open(x)]
    return status


def forget(stack: LocalStack, run: str) -> None:
    """Delete a waiting Run and its Reservation (whose claim would protect the nodes)."""
    stack.kubectl("delete", "run", run, "-n", NS)
    stack.kubectl("delete", "reservations", "--all", "-n", NS)


# ---------------------------------------------------------------------------- the flows


def test_a_foreign_gpu_pod_keeps_its_gpus(clean: LocalStack, fleet: Fleet) -> None:
    stack = clean
    first, second = fleet("cap-gpu", 2)
    start_others(stack, other_pod("notebook", first, nvidia_com_gpu="8"))
    apply_yaml(stack, capacity_run("fits-beside", "cap-gpu", 8))
    assert placed(stack, "fits-beside") == {second: 8}
    apply_yaml(stack, capacity_run("one-too-many", "cap-gpu", 8))
    status = held_back(stack, "one-too-many")
    assert str(status.get("message")).startswith("NoCapacity"), status


def test_a_daemonset_style_pod_on_every_node(clean: LocalStack, fleet: Fleet) -> None:
    stack = clean
    nodes = fleet("cap-ds", 2)
    start_others(
        stack,
        *(other_pod(f"agent-{n}", n, nvidia_com_gpu="1", cpu="100m") for n in nodes),
    )
    apply_yaml(stack, capacity_run("seven-each", "cap-ds", 14))
    assert placed(stack, "seven-each") == {n: 7 for n in nodes}


def test_a_tainted_node_takes_only_tolerating_runs(clean: LocalStack, fleet: Fleet) -> None:
    stack = clean
    tainted, free = fleet("cap-taint", 2)
    stack.kubectl("taint", "node", tainted, "maintenance=planned:NoSchedule")
    apply_yaml(stack, capacity_run("intolerant", "cap-taint", 8))
    assert placed(stack, "intolerant") == {free: 8}
    apply_yaml(stack, capacity_run("intolerant-too", "cap-taint", 8))
    held_back(stack, "intolerant-too")
    forget(stack, "intolerant-too")
    tolerant = template()
    tolerant["spec"]["tolerations"] = [
        {"key": "maintenance", "operator": "Exists", "effect": "NoSchedule"}
    ]
    apply_yaml(stack, capacity_run("tolerant", "cap-taint", 8, template=tolerant))
    assert placed(stack, "tolerant") == {tainted: 8}
    pod = run_pods(stack, NS, "tolerant")[0]
    assert pod["spec"]["tolerations"][0]["key"] == "maintenance", pod["spec"]
    assert all(t["key"] != "kwok.x-k8s.io/node" for t in pod["spec"]["tolerations"])


def test_a_template_too_big_for_any_node_is_refused(clean: LocalStack, fleet: Fleet) -> None:
    stack = clean
    fleet("cap-big", 2)
    apply_yaml(stack, capacity_run("huge", "cap-big", 8, template=template(memory="64Ti")))
    status = wait_phase(stack, NS, "huge", "Failed", timeout=60)
    assert status["message"] == (
        "ResourcesDoNotFit: memory 64Ti per rank exceeds every H100-80GB node (largest 512Gi)"
    ), status
    failed = condition(status, "Failed")
    assert failed is not None and failed["reason"] == "ResourcesDoNotFit", status
    assert all_run_leases(stack, NS, "huge") == []


def test_a_template_that_fits_only_some_nodes(clean: LocalStack, fleet: Fleet) -> None:
    stack = clean
    small = fleet("cap-some", 2)
    big = fleet("cap-some-big", 1, memory="2Ti")
    where = {"region": "us-west", "cluster": "cap"}
    apply_yaml(
        stack,
        budget_manifest(BUDGET, OWNER, [envelope("cap", where, 64)]),
        run_manifest("roomy", NS, OWNER, 8, selector=where, template=template(memory="1Ti")),
    )
    assert placed(stack, "roomy") == {big[0]: 8}
    assert small and all(n not in placed(stack, "roomy") for n in small)


def test_cpu_and_memory_held_by_other_pods(clean: LocalStack, fleet: Fleet) -> None:
    stack = clean
    cpu_full, memory_full = fleet("cap-full", 2)
    start_others(
        stack,
        other_pod("cpu-hog", cpu_full, cpu="60"),
        other_pod("memory-hog", memory_full, memory="500Gi"),
    )
    ask = template(cpu="8", memory="64Gi")
    apply_yaml(stack, capacity_run("squeezed", "cap-full", 8, template=ask))
    status = held_back(stack, "squeezed")
    assert str(status.get("message")).startswith("NoCapacity"), status
    stack.kubectl("delete", "pod", "cpu-hog", "-n", NS, "--grace-period=0", "--force")
    forget(stack, "squeezed")
    apply_yaml(stack, capacity_run("squeezed-again", "cap-full", 8, template=ask))
    assert placed(stack, "squeezed-again") == {cpu_full: 8}
