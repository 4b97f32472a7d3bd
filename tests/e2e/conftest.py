"""End-to-end fixtures: the whole local Jobtree (the same code path as ``jobtree-local up``).

``stack`` starts its own nats-server, etcd + kube-apiserver + KWOK with the administrator guide's
fleet (16 nodes per fabric domain, 8 GPUs each: the 128-GPU samples need 96 GPUs in nv-a and 32 in
nv-b), the CRDs and the five service processes, once per session. It is independent of the
``kube``/``nats_server`` fixtures of ``tests/conftest.py``.

When a test fails, the tail of every service log is attached to the report.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.local.stack import LocalStack, running_stack
from shared.localenv.processes import tail
from shared.localenv.services import SERVICES

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "config" / "samples"
GROUP = "rq.davidlangworthy.io"
LEASES = f"leases.{GROUP}"
RUNS = f"runs.{GROUP}"
BUDGETS = f"budgets.{GROUP}"
RESERVATIONS = f"reservations.{GROUP}"

T = TypeVar("T")


def _progress(message: str) -> None:
    print(f"e2e stack: {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The whole local Jobtree, ready (every service's /readyz answered 200)."""
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        nodes_per_domain=16,
        gpus_per_node=8,
        ready_timeout=180.0,
        progress=_progress,
    ) as local:
        yield local


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """On a failed test using ``stack``, attach each service's last log lines."""
    outcome = yield
    report = outcome.get_result()
    local = getattr(item, "funcargs", {}).get("stack")
    if report.failed and report.when in ("setup", "call") and isinstance(local, LocalStack):
        for name in SERVICES:
            report.sections.append(
                (f"{name} log (last 40 lines)", tail(local.services.log_path(name), 40))
            )


def eventually(check: Callable[[], T], *, timeout: float = 90.0, interval: float = 0.5) -> T:
    """Retry ``check`` until it returns without an AssertionError; re-raise the last one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def get_json(stack: LocalStack, *args: str) -> Any:
    return json.loads(stack.kubectl("get", *args, "-o", "json").stdout)


def apply_sample(stack: LocalStack, path: str, namespace: str | None = None) -> None:
    """``kubectl apply -f config/samples/<path>``, exactly as the administrator guide runs it."""
    ns = ["-n", namespace] if namespace else []
    stack.kubectl("apply", *ns, "-f", f"config/samples/{path}")


def create_namespace(stack: LocalStack, name: str, owners: str) -> None:
    """A namespace (never deleted: no namespace controller) authorised for the owner globs
    ``owners``: tenancy is closed, an unannotated namespace may name no owner."""
    stack.kubectl("create", "namespace", name, check=False)
    stack.kubectl("annotate", "--overwrite", "namespace", name, f"{GROUP}/owners={owners}")


def open_leases(stack: LocalStack, selector: str | None = None) -> list[dict[str, Any]]:
    """Jobtree Leases not closed, optionally filtered by a label selector."""
    args = [LEASES] + (["-l", selector] if selector else [])
    items: list[dict[str, Any]] = get_json(stack, *args)["items"]
    return [i for i in items if not (i.get("status") or {}).get("closed")]


def run_leases(stack: LocalStack, namespace: str, run: str) -> list[dict[str, Any]]:
    return open_leases(stack, f"{GROUP}/run={run},{GROUP}/namespace={namespace}")


def run_object(stack: LocalStack, namespace: str, run: str) -> dict[str, Any]:
    obj: dict[str, Any] = get_json(stack, "-n", namespace, RUNS, run)
    return obj


def run_pods(stack: LocalStack, namespace: str, run: str) -> list[dict[str, Any]]:
    """Pods owned by the Run (ownerReference kind Run, same name)."""
    pods: list[dict[str, Any]] = get_json(stack, "-n", namespace, "pods")["items"]
    return [
        p
        for p in pods
        if any(
            ref.get("kind") == "Run" and ref.get("name") == run
            for ref in p["metadata"].get("ownerReferences", [])
        )
    ]


def budget_status(stack: LocalStack, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get_json(stack, BUDGETS, name).get("status") or {}
    return status


def by_name(items: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    for item in items or []:
        if item.get("name") == name:
            return item
    raise AssertionError(f"no entry named {name!r} in {items!r}")


def node_labels(stack: LocalStack) -> dict[str, dict[str, str]]:
    nodes = get_json(stack, "nodes")["items"]
    return {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in nodes}


def pod_gpus(pod: dict[str, Any], resource: str = "nvidia.com/gpu") -> int:
    return sum(
        int((c.get("resources") or {}).get("limits", {}).get(resource, 0))
        for c in pod["spec"]["containers"]
    )


def describe_leases(leases: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {lease['metadata']['name']}: nodes={lease['spec']['slice']['nodes']} "
        f"gpus={lease['spec']['slice']['gpus']} role={lease['spec']['slice']['role']} "
        f"payer={lease['spec'].get('paidByBudget')}/{lease['spec'].get('paidByEnvelope')} "
        f"({lease['spec'].get('paidByOwner')}) status={lease.get('status')}"
        for lease in leases
    )


@pytest.fixture
def clean(stack: LocalStack) -> LocalStack:
    """The stack with no Runs, no Reservations and no open Leases left by earlier tests.

    Deleting a Run must close its Leases (``Canceled``) and remove its pods (SPEC §3); this waits
    for exactly that, so a failure here is a real failure of that behaviour.
    """
    stack.kubectl("delete", RESERVATIONS, "--all", "-A", "--wait=false")
    stack.kubectl("delete", RUNS, "--all", "-A", "--wait=false")

    def no_runs() -> None:
        left = get_json(stack, RUNS, "-A")["items"]
        assert not left, "Runs not deleted: " + ", ".join(
            f"{r['metadata']['namespace']}/{r['metadata']['name']}" for r in left
        )

    def all_closed() -> None:
        left = open_leases(stack)
        assert not left, "Leases still open after their Runs were deleted:\n" + describe_leases(
            left
        )

    eventually(no_runs, timeout=60)
    eventually(all_closed, timeout=90)
    return stack
