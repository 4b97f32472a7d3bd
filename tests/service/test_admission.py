"""The admission service in-process against a real nats-server and a real kube-apiserver.

What admission decides on its own is exercised end to end through the API server: tenancy,
``after`` dependencies, Pending with a typed reason when the packer or the forecaster does not
answer, Running/Completed/requeue derived from real Lease objects (created here with kubectl, as
the binder would), Budget status and budget metrics replayed from those Leases, and the HTTPS
webhook registered with the API server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.admission.config import AdmissionConfig
from services.admission.service import AdmissionService
from services.admission.webhook import mutation_patch, review_response, validate_object
from shared.api.lease import label_value
from shared.bus.config import ServiceConfig
from shared.control.tenancy import OWNERS_ANNOTATION
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats]
session_loop = pytest.mark.asyncio(loop_scope="session")

T = TypeVar("T")
TENANT_NS = "t-adm-tenancy"
FLAVOR = "H100-80GB"


# -- helpers --------------------------------------------------------------------------------------


async def kubectl(
    plane: ControlPlane, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Real kubectl, off the event loop (the service under test shares the loop)."""
    return await asyncio.to_thread(plane.kubectl, *args, input=input, check=check)


async def apply(plane: ControlPlane, *docs: dict[str, Any]) -> None:
    await kubectl(
        plane,
        "apply",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": list(docs)}),
    )


async def get(plane: ControlPlane, *args: str) -> dict[str, Any]:
    done = await kubectl(plane, "get", *args, "-o", "json")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


async def wait_for(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 20.0) -> T:
    """Poll ``probe`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def run_status(
    plane: ControlPlane, ns: str, name: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status = (await get(plane, "runs.rq.davidlangworthy.io", "-n", ns, name)).get("status")
        return status if status and check(status) else None

    return await wait_for(probe, f"run {ns}/{name}: {what}")


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    for item in status.get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    raise AssertionError(f"no {type_} condition in {status}")


def run_doc(name: str, ns: str, owner: str, gpus: int = 8, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"owner": owner, "resources": {"gpuType": FLAVOR, "totalGPUs": gpus}, **spec},
    }


def budget_doc(name: str, owner: str, concurrency: int, **extra: Any) -> dict[str, Any]:
    envelope = {
        "name": "west",
        "flavor": FLAVOR,
        "selector": {"region": "us-west"},
        "concurrency": concurrency,
        **extra,
    }
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Budget",
        "metadata": {"name": name},
        "spec": {"owner": owner, "envelopes": [envelope]},
    }


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def lease_doc(
    name: str,
    *,
    run: tuple[str, str],
    owner: str,
    budget: str,
    gpus: int,
    start: datetime,
    role: str = "Active",
    rank: int = 0,
    run_uid: str | None = None,
) -> dict[str, Any]:
    """A Lease as the binder writes it (one rank on one node, paid by the owner's envelope)."""
    labels = {"rq.davidlangworthy.io/funding": "owned"}
    if run_uid:
        labels["rq.davidlangworthy.io/run-uid"] = label_value(run_uid)
    position = "SPARE[0]" if role == "Spare" else f"RANK[{rank}]"
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "owner": owner,
            "runRef": {"name": run[1], "namespace": run[0]},
            "compPath": ["GROUP[0]", position],
            "slice": {"nodes": [f"adm-node-{rank}"], "gpus": gpus, "role": role},
            "interval": {"start": stamp(start)},
            "paidByEnvelope": "west",
            "paidByBudget": budget,
            "paidByOwner": owner,
            "reason": "Start",
        },
    }


async def close_lease(plane: ControlPlane, name: str, closure: str) -> None:
    body = {
        "status": {"closed": True, "endTime": stamp(datetime.now(UTC)), "closureReason": closure}
    }
    await kubectl(
        plane,
        "patch",
        "leases.rq.davidlangworthy.io",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(body),
    )


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def admission(
    nats_server: NatsServer, crds: ControlPlane, namespace: str
) -> AsyncIterator[AdmissionService]:
    await apply(
        crds,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": TENANT_NS, "annotations": {OWNERS_ANNOTATION: "org:adm:*"}},
        },
        {  # tenancy is closed: the module's namespace speaks for the owners its tests name
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": namespace,
                "annotations": {OWNERS_ANNOTATION: "org:adm:*,lonely:*,flowa:*,flowb:*"},
            },
        },
    )
    config = AdmissionConfig(
        service=ServiceConfig(
            name="admission",
            nats_url=nats_server.url,
            credentials=nats_server.credentials("admission"),
            kubeconfig=str(crds.kubeconfig),
            http_host="127.0.0.1",
            http_port=0,
            log_level="INFO",
            log_format="text",
        ),
        resync_seconds=3.0,
        budget_interval=0.3,
        plan_timeout=1.0,
        commit_timeout=2.0,
        reserve_timeout=1.0,
        backoff_seconds=1.0,
        webhook_port=0,
        webhook_host="127.0.0.1",
        tls_hosts=("127.0.0.1",),
    )
    service = AdmissionService(config)
    await service.start()
    await asyncio.wait_for(service.ready.wait(), 30)
    yield service
    await service.stop()


# -- pure webhook rules ---------------------------------------------------------------------------


def test_webhook_review_rules() -> None:
    run = run_doc("r", "ns", "org:ml:x")
    assert validate_object(run, "ns", {OWNERS_ANNOTATION: "org:ml:*"}) == (True, "", 200)
    allowed, message, code = validate_object(run, "ns", {OWNERS_ANNOTATION: "org:ai:*"})
    assert not allowed and code == 403 and "'org:ml:x'" in message and "'ns'" in message
    bad = run_doc("r", "ns", "Org:Bad")
    allowed, message, code = validate_object(bad, "ns", None)
    assert not allowed and code == 422 and "spec.owner" in message
    elastic = run_doc(
        "e", "ns", "org:a", malleable={"minTotalGPUs": 8, "maxTotalGPUs": 32, "stepGPUs": 8}
    )
    assert mutation_patch(elastic) == [
        {"op": "add", "path": "/spec/locality", "value": {"allowCrossGroupSpread": True}},
        {"op": "add", "path": "/spec/malleable/desiredTotalGPUs", "value": 32},
    ]
    explicit = run_doc("x", "ns", "org:a", locality={"allowCrossGroupSpread": False})
    assert mutation_patch(explicit) == []
    patched = review_response("u1", allowed=True, patch=mutation_patch(elastic))["response"]
    assert patched["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(patched["patch"]))[1]["value"] == 32


# -- the service ----------------------------------------------------------------------------------


@session_loop
async def test_probes_and_metrics(admission: AdmissionService) -> None:
    base = f"http://127.0.0.1:{admission.runtime.http_port}"
    assert (await asyncio.to_thread(h.http_get, f"{base}/healthz", 5.0))[0] == 200
    assert (await asyncio.to_thread(h.http_get, f"{base}/readyz", 5.0))[0] == 200
    code, body = await asyncio.to_thread(h.http_get, f"{base}/metrics", 5.0)
    assert code == 200 and "jobtree_runs_admission_latency_seconds" in body


@session_loop
async def test_unauthorized_owner_fails(admission: AdmissionService, crds: ControlPlane) -> None:
    await apply(crds, run_doc("intruder", TENANT_NS, "org:other:x"))
    status = await run_status(
        crds, TENANT_NS, "intruder", lambda s: s.get("phase") == "Failed", "Failed"
    )
    assert status["message"].startswith("Unauthorized:")
    assert "'org:other:x'" in status["message"] and f"'{TENANT_NS}'" in status["message"]
    assert cond(status, "Unauthorized")["status"] == "True"
    assert cond(status, "Failed")["reason"] == "Unauthorized"


@session_loop
async def test_after_waits_then_fails_with_upstream(
    admission: AdmissionService, crds: ControlPlane
) -> None:
    await apply(crds, run_doc("child", TENANT_NS, "org:adm:x", after=["parent"]))
    waiting = await run_status(
        crds, TENANT_NS, "child", lambda s: s.get("phase") == "Pending", "Pending"
    )
    assert cond(waiting, "WaitingForUpstream")["status"] == "True"
    assert "not found yet: parent" in waiting["message"]
    # The upstream fails (its owner is not authorised here): the child fails with it.
    await apply(crds, run_doc("parent", TENANT_NS, "org:other:y"))
    failed = await run_status(
        crds, TENANT_NS, "child", lambda s: s.get("phase") == "Failed", "Failed"
    )
    assert cond(failed, "Failed")["reason"] == "UpstreamFailed"
    assert failed["message"] == "UpstreamFailed: upstream Run(s) parent failed"


@session_loop
async def test_pending_with_typed_reason_when_the_packer_does_not_answer(
    admission: AdmissionService, crds: ControlPlane, namespace: str
) -> None:
    await apply(crds, budget_doc("adm-plan", "org:adm:plan", 32))
    await apply(crds, run_doc("no-packer", namespace, "org:adm:plan", 8))
    status = await run_status(
        crds,
        namespace,
        "no-packer",
        lambda s: str(s.get("message", "")).startswith("PackerUnavailable"),
        "PackerUnavailable",
    )
    assert status["phase"] == "Pending"
    assert cond(status, "Scheduled") | {"lastTransitionTime": ""} == {
        "type": "Scheduled",
        "status": "False",
        "reason": "PackerUnavailable",
        "message": status["message"],
        "lastTransitionTime": "",
        "observedGeneration": 1,
    }
    assert status["width"] == {"min": 8, "max": 8, "desired": 8, "allocated": 0, "pending": 8}


@session_loop
async def test_blocked_run_stays_pending_with_the_cover_reason_without_forecast(
    admission: AdmissionService, crds: ControlPlane, namespace: str
) -> None:
    await apply(crds, run_doc("unfunded", namespace, "lonely:nobody", 16))
    status = await run_status(
        crds, namespace, "unfunded", lambda s: bool(s.get("message")), "a message"
    )
    assert status["phase"] == "Pending"
    assert status["message"].startswith("NoEnvelope: no H100-80GB envelope")
    scheduled = cond(status, "Scheduled")
    assert scheduled["reason"] == "NoEnvelope"
    assert "forecast unavailable" in scheduled["message"]


@session_loop
async def test_running_width_and_funding_follow_leases_then_completed(
    admission: AdmissionService, crds: ControlPlane, namespace: str
) -> None:
    await apply(crds, budget_doc("adm-run", "org:adm:run", 64))
    await apply(crds, run_doc("leased", namespace, "org:adm:run", 16))
    run = await get(crds, "runs.rq.davidlangworthy.io", "-n", namespace, "leased")
    uid = run["metadata"]["uid"]
    start = datetime.now(UTC) - timedelta(minutes=30)
    names = ["adm-leased-0", "adm-leased-1"]
    await apply(
        crds,
        *(
            lease_doc(
                n,
                run=(namespace, "leased"),
                owner="org:adm:run",
                budget="adm-run",
                gpus=8,
                start=start,
                rank=i,
                run_uid=uid,
            )
            for i, n in enumerate(names)
        ),
    )
    running = await run_status(
        crds, namespace, "leased", lambda s: s.get("phase") == "Running", "Running"
    )
    assert running["width"]["allocated"] == 16 and running["width"]["pending"] == 0
    assert running["funding"]["ownedGPUs"] == 16
    assert 7.9 < running["funding"]["ownedGPUHours"] < 8.5
    assert cond(running, "Scheduled")["reason"] == "Bound"
    for name in names:
        await close_lease(crds, name, "Completed")
    done = await run_status(
        crds, namespace, "leased", lambda s: s.get("phase") == "Completed", "Completed"
    )
    assert done["width"]["allocated"] == 0
    assert cond(done, "Completed")["status"] == "True"


@session_loop
async def test_failed_attempt_requeues_from_checkpoint(
    admission: AdmissionService, crds: ControlPlane, namespace: str
) -> None:
    await apply(crds, budget_doc("adm-ckpt", "org:adm:ckpt", 64))
    runtime = {"checkpoint": "10m", "maxRestarts": 1}
    await apply(crds, run_doc("ckpt", namespace, "org:adm:ckpt", 8, runtime=runtime))
    run = await get(crds, "runs.rq.davidlangworthy.io", "-n", namespace, "ckpt")
    await apply(
        crds,
        lease_doc(
            "adm-ckpt-0",
            run=(namespace, "ckpt"),
            owner="org:adm:ckpt",
            budget="adm-ckpt",
            gpus=8,
            start=datetime.now(UTC) - timedelta(minutes=5),
            run_uid=run["metadata"]["uid"],
        ),
    )
    await run_status(crds, namespace, "ckpt", lambda s: s.get("phase") == "Running", "Running")
    await close_lease(crds, "adm-ckpt-0", "NodeFailure")
    requeued = await run_status(
        crds, namespace, "ckpt", lambda s: s.get("restarts") == 1, "restarts 1"
    )
    assert requeued["phase"] == "Pending"
    assert cond(requeued, "Requeued")["reason"] == "NodeFailure"
    assert "restart 1 of 1" in cond(requeued, "Requeued")["message"]


@session_loop
async def test_budget_status_and_metrics_replay_real_leases(
    admission: AdmissionService, crds: ControlPlane
) -> None:
    await apply(crds, budget_doc("adm-budget", "org:adm:acct", 32, maxGPUHours=1000.0))
    start = datetime.now(UTC) - timedelta(hours=1)
    await apply(
        crds,
        lease_doc(
            "adm-acct-active",
            run=("t-adm-ghost", "ghost"),
            owner="org:adm:acct",
            budget="adm-budget",
            gpus=8,
            start=start,
        ),
        lease_doc(
            "adm-acct-spare",
            run=("t-adm-ghost", "ghost"),
            owner="org:adm:acct",
            budget="adm-budget",
            gpus=2,
            start=start,
            role="Spare",
        ),
    )

    async def headroom() -> dict[str, Any] | None:
        budget = await get(crds, "budgets.rq.davidlangworthy.io", "adm-budget")
        envs = (budget.get("status") or {}).get("envelopes") or []
        if envs and envs[0]["headroom"]["concurrency"] == 22:
            return dict(budget["status"])
        return None

    status = await wait_for(headroom, "budget headroom 22")
    west = status["envelopes"][0]
    assert west["active"] is True
    assert 989.0 < west["headroom"]["gpuHours"] < 990.1
    assert west["usage"]["owned"]["gpus"] == 8 and west["usage"]["spare"]["gpus"] == 2
    assert west["usage"]["shared"]["gpus"] == 0 and west["usage"]["borrowedOut"]["gpus"] == 0
    assert status["observedGeneration"] == 1 and status["updatedAt"].endswith("Z")
    url = f"http://127.0.0.1:{admission.runtime.http_port}/metrics"
    _, body = await asyncio.to_thread(h.http_get, url, 5.0)
    assert 'jobtree_budget_headroom_gpus{budget="adm-budget",envelope="west"} 22.0' in body
    assert (
        'jobtree_budgets_concurrency_gpus{budget="adm-budget",class="spare",envelope="west",'
        'flavor="H100-80GB",owner="org:adm:acct"} 2.0'
    ) in body
    assert (
        'jobtree_spares_concurrency_gpus{budget="adm-budget",envelope="west",'
        'flavor="H100-80GB",owner="org:adm:acct"} 2.0'
    ) in body
    await close_lease(crds, "adm-acct-active", "Completed")

    async def freed() -> bool:
        budget = await get(crds, "budgets.rq.davidlangworthy.io", "adm-budget")
        envs = (budget.get("status") or {}).get("envelopes") or []
        return bool(envs) and envs[0]["headroom"]["concurrency"] == 30

    await wait_for(freed, "headroom back to 30 after the lease closed")


@session_loop
async def test_webhook_registered_with_the_api_server_denies_unauthorised_owner(
    admission: AdmissionService, crds: ControlPlane
) -> None:
    hook = admission.webhook
    assert hook is not None
    selector = {"matchLabels": {"kubernetes.io/metadata.name": TENANT_NS}}
    rules = [
        {
            "apiGroups": ["rq.davidlangworthy.io"],
            "apiVersions": ["v1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["runs"],
            "scope": "Namespaced",
        }
    ]

    def webhook(path: str, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "clientConfig": {
                "url": f"https://127.0.0.1:{hook.port}/{path}",
                "caBundle": hook.ca_bundle,
            },
            "rules": rules,
            "namespaceSelector": selector,
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }

    await apply(
        crds,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "jobtree-admission-test"},
            "webhooks": [webhook("validate", "runs.validate.rq.davidlangworthy.io")],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "jobtree-admission-test"},
            "webhooks": [webhook("mutate", "runs.mutate.rq.davidlangworthy.io")],
        },
    )
    try:
        manifest = json.dumps(run_doc("webhook-intruder", TENANT_NS, "org:other:z"))

        async def denied() -> str | None:
            done = await kubectl(crds, "apply", "-f", "-", input=manifest, check=False)
            return done.stderr if done.returncode != 0 else None

        error = await wait_for(denied, "the webhook to deny the Run")
        assert 'admission webhook "runs.validate.rq.davidlangworthy.io" denied' in error
        assert "Unauthorized: namespace 't-adm-tenancy' is not authorised for owner" in error
        assert "'org:other:z'" in error
        elastic = run_doc(
            "webhook-elastic",
            TENANT_NS,
            "org:adm:elastic",
            8,
            malleable={"minTotalGPUs": 8, "maxTotalGPUs": 24, "stepGPUs": 8},
        )
        await apply(crds, elastic)
        stored = await get(crds, "runs.rq.davidlangworthy.io", "-n", TENANT_NS, "webhook-elastic")
        assert stored["spec"]["malleable"]["desiredTotalGPUs"] == 24
        assert stored["spec"]["locality"]["allowCrossGroupSpread"] is True
    finally:
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            await kubectl(crds, "delete", kind, "jobtree-admission-test", check=False)


@session_loop
async def test_process_serves_probes_and_exits_cleanly_on_sigterm(
    nats_server: NatsServer, crds: ControlPlane, tmp_path: Path
) -> None:
    log = tmp_path / "admission.log"
    proc, port = h.spawn_service("admission", crds, nats_server, log, log_format="json")
    try:
        await h.wait_ready(proc, port, log)
        assert await h.terminate(proc, 15) == 0
    finally:
        h.kill(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "admission ready" for line in lines)
    assert any(line["msg"] == "service stopped" for line in lines)


# -- the whole pipeline: admission with the real packer, binder and forecaster --------------------

FLOW_FLAVOR = "A100-40GB"
FLOW_LABELS = {
    "region": "adm-r",
    "cluster": "adm-c",
    "fabric.domain": "adm-f",
    "gpu.flavor": FLOW_FLAVOR,
}


@pytest.fixture(scope="module")
async def pipeline(
    admission: AdmissionService, nats_server: NatsServer, crds: ControlPlane
) -> AsyncIterator[list[str]]:
    """The real packer, binder and forecaster in-process next to admission, and 3 KWOK nodes.

    Started after the admission-only tests above (which need them absent) and torn down first.
    """
    from services.binder.service import Binder, BinderOptions
    from services.forecast.config import ForecastOptions
    from services.forecast.service import Forecaster
    from services.packer.service import Packer
    from shared.bus import ServiceRuntime

    nodes = await asyncio.to_thread(h.add_nodes, crds, "adm-flow", 3, **FLOW_LABELS)
    async with h.kube_api(crds) as api:
        packer = Packer(
            ServiceRuntime(
                "packer", nats_url=nats_server.url, credentials=nats_server.credentials("packer")
            ),
            api,
        )
        binder = Binder(
            ServiceRuntime(
                "binder", nats_url=nats_server.url, credentials=nats_server.credentials("binder")
            ),
            api,
            BinderOptions(tick_seconds=0.2),
        )
        forecaster = Forecaster(
            ServiceRuntime(
                "forecast",
                nats_url=nats_server.url,
                credentials=nats_server.credentials("forecast"),
            ),
            api,
            ForecastOptions(tick_seconds=0.5),
        )
        async with h.started(packer, binder, forecaster):
            yield nodes


def flow_budget(name: str, owner: str, concurrency: int) -> dict[str, Any]:
    doc = budget_doc(name, owner, concurrency)
    env = doc["spec"]["envelopes"][0]
    env["flavor"], env["selector"] = FLOW_FLAVOR, {"region": "adm-r"}
    return doc


def flow_run(name: str, ns: str, owner: str, gpus: int, **spec: Any) -> dict[str, Any]:
    doc = run_doc(name, ns, owner, gpus, locality={"groupGPUs": 8}, **spec)
    doc["spec"]["resources"]["gpuType"] = FLOW_FLAVOR
    return doc


async def open_leases(plane: ControlPlane, ns: str, run: str) -> list[dict[str, Any]]:
    selector = f"rq.davidlangworthy.io/run={run},rq.davidlangworthy.io/namespace={ns}"
    items = (await get(plane, "leases.rq.davidlangworthy.io", "-l", selector))["items"]
    return [item for item in items if not (item.get("status") or {}).get("closed")]


@session_loop
async def test_flow_bind_now_then_grow_when_capacity_frees(
    admission: AdmissionService, pipeline: list[str], crds: ControlPlane, namespace: str
) -> None:
    await apply(crds, flow_budget("adm-flow-a", "flowa:team", 64))
    await apply(crds, flow_run("hog", namespace, "flowa:team", 16))
    hog = await run_status(
        crds, namespace, "hog", lambda s: s.get("phase") == "Running", "hog Running"
    )
    assert hog["width"]["allocated"] == 16 and hog["funding"]["ownedGPUs"] == 16
    assert len(await open_leases(crds, namespace, "hog")) == 2
    elastic = flow_run(
        "elastic",
        namespace,
        "flowa:team",
        8,
        malleable={"minTotalGPUs": 8, "maxTotalGPUs": 16, "stepGPUs": 8},
    )
    await apply(crds, elastic)
    small = await run_status(
        crds, namespace, "elastic", lambda s: s.get("phase") == "Running", "elastic Running"
    )
    assert small["width"] == {"min": 8, "max": 16, "desired": 16, "allocated": 8, "pending": 8}
    # The hog goes away: the binder ends its leases (Canceled) and the elastic Run grows.
    await kubectl(crds, "delete", "runs.rq.davidlangworthy.io", "-n", namespace, "hog")
    grown = await run_status(
        crds,
        namespace,
        "elastic",
        lambda s: (s.get("width") or {}).get("allocated") == 16,
        "elastic grown to 16",
    )
    assert grown["width"]["pending"] == 0
    reasons = sorted(
        lease["spec"]["reason"] for lease in await open_leases(crds, namespace, "elastic")
    )
    assert reasons == ["Grow", "Start"]
    url = f"http://127.0.0.1:{admission.runtime.http_port}/metrics"
    _, body = await asyncio.to_thread(h.http_get, url, 5.0)
    assert 'jobtree_runs_admission_latency_seconds_count{flavor="A100-40GB",result="bound"}' in body


@session_loop
async def test_flow_blocked_run_is_reserved_with_its_typed_reason(
    admission: AdmissionService, pipeline: list[str], crds: ControlPlane, namespace: str
) -> None:
    await apply(crds, flow_budget("adm-flow-b", "flowb:team", 8))
    await apply(crds, flow_run("big", namespace, "flowb:team", 16))
    status = await run_status(
        crds, namespace, "big", lambda s: s.get("phase") == "Reserved", "Reserved"
    )
    assert status["message"].startswith("InsufficientCapacity: flowb:team needs 16")
    assert cond(status, "Scheduled")["reason"] == "InsufficientCapacity"
    assert status["earliestStart"] and status["pendingReservation"]
    resv = await get(
        crds, "reservations.rq.davidlangworthy.io", "-n", namespace, status["pendingReservation"]
    )
    assert resv["spec"]["runRef"]["name"] == "big"
