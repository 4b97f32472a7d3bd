"""The real stack the pod and tenancy attacks run against, once for this package.

The session's kube-apiserver (with KWOK nodes) and nats-server, and admission, packer and binder
as service processes (``python -m services.<name>``). Admission serves its webhook over HTTPS and
it is registered with the API server for the ``sec-hooked*`` namespaces only, so each attack can
be tried both through the webhook and around it (the reconcile and the binder must refuse it
too). Package scope: the processes stop when this package's tests are done, before other
packages create Runs of their own.

The commit and event attacks run against the whole local stack instead (the e2e ``stack``: its
own nats-server, control plane and the five services), as a compromised peer would.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.admission.webhook import self_signed
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer
from shared.localenv.processes import free_port
from tests.conftest import ensure_namespace
from tests.e2e.conftest import clean, pytest_runtest_makereport, stack
from tests.service import helpers as h

__all__ = ["clean", "pytest_runtest_makereport", "stack"]

OWNER = "sec:team"
REGION = "sec-r"
BUDGET = "sec-budget"
HOOKED = "sec-hooked"
"""Authorised for ``sec:*``; Runs here go through the webhook."""
HOOKED_BARE = "sec-hooked-bare"
"""No owners annotation; through the webhook."""
DIRECT = "sec-direct"
"""Authorised for ``sec:*``; no webhook: admission's reconcile and the binder must refuse."""
DIRECT_BARE = "sec-direct-bare"
"""No owners annotation, no webhook."""
RESTRICTED = "sec-restricted"
"""Authorised for ``sec:*``, PodSecurity ``restricted`` enforced."""
BASELINE = "sec-baseline"
"""Authorised for ``sec:*``, PodSecurity ``baseline`` enforced."""
NAMESPACES = (HOOKED, HOOKED_BARE, DIRECT, DIRECT_BARE, RESTRICTED, BASELINE)
OWNERS = "rq.davidlangworthy.io/owners"
WEBHOOK = "jobtree-security-test"


@dataclass
class SecureStack:
    """What the attacks need: the control plane, the bus, the nodes, the service processes."""

    kube: ControlPlane
    nats: NatsServer
    nodes: list[str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.kube.kubectl(*args, input=input, check=check)

    def service_logs(self) -> str:
        return "\n".join(
            f"--- {name}.log\n"
            + "\n".join((self.logs / f"{name}.log").read_text().splitlines()[-30:])
            for name in self.procs
        )


def _register_webhook(kube: ControlPlane, port: int, ca_bundle: str) -> None:
    rules = [
        {
            "apiGroups": ["rq.davidlangworthy.io"],
            "apiVersions": ["v1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["runs"],
            "scope": "Namespaced",
        }
    ]
    selector = {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "In",
                "values": [HOOKED, HOOKED_BARE],
            }
        ]
    }
    doc = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK},
        "webhooks": [
            {
                "name": "runs.validate.rq.davidlangworthy.io",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/validate",
                    "caBundle": ca_bundle,
                },
                "rules": rules,
                "namespaceSelector": selector,
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
            }
        ],
    }
    h.apply(kube, doc)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()
        if h.http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
            return
        assert time.monotonic() < deadline, f"not ready after {timeout}s:\n{log.read_text()}"
        time.sleep(0.3)


@pytest.fixture(scope="package")
def secure(
    crds: ControlPlane, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureStack]:
    kube = crds
    logs = tmp_path_factory.mktemp("security")
    nodes = h.add_nodes(
        kube,
        "sec-node",
        2,
        region=REGION,
        cluster="sec-c",
        **{"fabric.domain": "sec-f", "gpu.flavor": h.FLAVOR},
    )
    h.apply(kube, h.budget_manifest(BUDGET, OWNER, REGION, 16))
    for name in NAMESPACES:
        ensure_namespace(kube, name)
    for name in (HOOKED, DIRECT, RESTRICTED, BASELINE):
        kube.kubectl("annotate", "--overwrite", "namespace", name, f"{OWNERS}=sec:*")
    for name, level in ((RESTRICTED, "restricted"), (BASELINE, "baseline")):
        kube.kubectl(
            "label", "--overwrite", "namespace", name, f"pod-security.kubernetes.io/enforce={level}"
        )
    cert, key = self_signed(["127.0.0.1"])
    (logs / "tls.crt").write_bytes(cert)
    (logs / "tls.key").write_bytes(key)
    webhook_port = free_port()
    stack = SecureStack(kube, nats_server, nodes, logs)
    extra = {
        "admission": (
            f"--webhook-port={webhook_port}",
            "--webhook-host=127.0.0.1",
            f"--tls-cert={logs / 'tls.crt'}",
            f"--tls-key={logs / 'tls.key'}",
            "--resync-seconds=5",
        ),
        "packer": (),
        "binder": ("--tick-seconds=0.5",),
    }
    try:
        ports = {}
        for name, args in extra.items():
            proc, port = h.spawn_service(name, kube, nats_server, logs / f"{name}.log", *args)
            stack.procs[name], ports[name] = proc, port
        for name, proc in stack.procs.items():
            _wait_ready(proc, ports[name], logs / f"{name}.log")
        _register_webhook(kube, webhook_port, base64.b64encode(cert).decode())
        yield stack
    finally:
        kube.kubectl(
            "delete", "validatingwebhookconfiguration", WEBHOOK, "--ignore-not-found", check=False
        )
        for proc in stack.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in stack.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                h.kill(proc)
        for ns in NAMESPACES:
            kube.kubectl("delete", h.RUNS, "--all", "-n", ns, "--wait=false", check=False)
            kube.kubectl(
                "delete", "pods", "--all", "-n", ns, "--wait=false", "--force", check=False
            )
        kube.kubectl(
            "delete", "budget.rq.davidlangworthy.io", BUDGET, "--ignore-not-found", check=False
        )
        kube.kubectl("delete", "nodes", *nodes, "--ignore-not-found", "--wait=false", check=False)


# -- helpers the attack modules share --------------------------------------------------------------


def run_manifest(
    namespace: str, name: str, template: dict[str, Any] | None, owner: str = OWNER
) -> dict[str, Any]:
    """An 8-GPU Run of ``owner`` over the test nodes (16 GPUs, so one fits beside another),
    with ``template``."""
    spec: dict[str, Any] = {
        "owner": owner,
        "resources": {"gpuType": h.FLAVOR, "totalGPUs": 8},
        "locality": {"groupGPUs": 8, "selector": {"region": REGION}},
    }
    if template is not None:
        spec["template"] = template
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def try_apply(stack: SecureStack, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``kubectl apply`` as a tenant would; the caller reads the answer."""
    done: subprocess.CompletedProcess[str] = stack.kubectl(
        "apply", "-f", "-", input=json.dumps(doc), check=False
    )
    return done


def leases_of(stack: SecureStack, namespace: str, run: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = h.get_json(
        stack.kube,
        h.LEASES,
        "-l",
        f"rq.davidlangworthy.io/run={run},rq.davidlangworthy.io/namespace={namespace}",
    )["items"]
    return items


def pods_of(stack: SecureStack, namespace: str, run: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = h.get_json(
        stack.kube, "pods", "-n", namespace, "-l", f"rq.davidlangworthy.io/run={run}"
    )["items"]
    return items


def run_status(
    stack: SecureStack, namespace: str, run: str, phase: str, timeout: float = 30
) -> dict[str, Any]:
    """The Run's status once it reaches ``phase`` (the service logs are the message if never)."""
    deadline = time.monotonic() + timeout
    while True:
        obj = h.get_json(stack.kube, h.RUNS, "-n", namespace, run)
        status: dict[str, Any] = obj.get("status") or {}
        if status.get("phase") == phase:
            return status
        assert time.monotonic() < deadline, (
            f"{namespace}/{run} never {phase}: {status}\n{stack.service_logs()}"
        )
        time.sleep(0.3)
