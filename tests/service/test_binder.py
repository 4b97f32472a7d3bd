"""The binder over a real nats-server and a real kube-apiserver with KWOK nodes.

The binder runs in-process; commits are sent over NATS exactly as admission and the resolver
send them, and every effect is read back from the API server with kubectl.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from services.binder.service import ANNOTATION_LEASES, Binder, BinderOptions
from shared.api import Lease as ApiLease
from shared.api.lease import label_value
from shared.bus import (
    COMMIT,
    LEDGER,
    CommitReply,
    CommitRequest,
    LeaseEnd,
    LedgerEvent,
    RunRef,
    ServiceRuntime,
    decode,
)
from shared.engine.bindplan import BindIntent, bind_plan
from shared.engine.model import FundingKind, LeaseReason, Role
from shared.engine.pack import GroupPlacement, PlacedSlice, Placement
from shared.kube.client import make_client
from shared.kube.translate import run_request
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer
from shared.localenv.processes import free_port

from .conftest import add_nodes

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[2]
GROUP = "rq.davidlangworthy.io"
LEASES = f"leases.{GROUP}"
OWNER = "org:bindtest"
ENVELOPE = "bt-budget/main"
LABELS = {"region": "bind-r", "cluster": "bind-c", "fabric.domain": "bind-f"}
DOMAIN = ("bind-r", "bind-c", "bind-f")


# --------------------------------------------------------------------------- helpers


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2) -> Any:
    """Retry ``check`` (sync, may run kubectl) until it stops raising AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.to_thread(check)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


def get_json(kube: ControlPlane, *args: str) -> Any:
    return json.loads(kube.kubectl("get", *args, "-o", "json").stdout)


def run_leases(kube: ControlPlane, namespace: str, run: str) -> list[ApiLease]:
    selector = f"{GROUP}/run={label_value(run)},{GROUP}/namespace={label_value(namespace)}"
    items = get_json(kube, LEASES, "-l", selector)["items"]
    return [ApiLease.parse(item) for item in items]


def run_pods(kube: ControlPlane, namespace: str, run: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(
        kube, "pods", "-n", namespace, "-l", f"{GROUP}/run={label_value(run)}"
    )["items"]
    return items


def closures(leases: Iterable[ApiLease]) -> set[str | None]:
    return {lease.status.closure_reason if lease.status else None for lease in leases}


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def apply(kube: ControlPlane, obj: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(obj))


def create_run(
    kube: ControlPlane, namespace: str, name: str, gpus: int, max_duration: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "owner": OWNER,
        "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus},
    }
    if max_duration:
        spec["runtime"] = {"maxDuration": max_duration}
    apply(
        kube,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Run",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        },
    )
    obj: dict[str, Any] = get_json(kube, "runs." + GROUP, "-n", namespace, name)
    return obj


def plan(
    run_obj: dict[str, Any],
    slices: list[tuple[str, int]],
    *,
    reason: LeaseReason = LeaseReason.START,
    attempt: int = 0,
) -> BindIntent:
    """A bind of one rank per (node, gpus), all paid by the test envelope."""
    request = run_request(run_obj)
    placed = tuple(
        PlacedSlice(
            node=node,
            gpus=gpus,
            role=Role.ACTIVE,
            group=0,
            rank=rank,
            envelope=ENVELOPE,
            payer_owner=OWNER,
            funding=FundingKind.OWNED,
        )
        for rank, (node, gpus) in enumerate(slices)
    )
    placement = Placement(groups=(GroupPlacement(index=0, domain=DOMAIN, slices=placed),))
    return bind_plan(request, placement, now=datetime.now(UTC), reason=reason, attempt=attempt)


def commit_of(
    run_obj: dict[str, Any],
    intent: BindIntent,
    reason: str = "",
    ends: Iterable[tuple[str, str]] = (),
) -> CommitRequest:
    meta = run_obj["metadata"]
    return CommitRequest(
        key=intent.key,
        run=RunRef(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=meta.get("generation", 1),
        ),
        version=0,
        leases=list(intent.leases),
        pods=list(intent.pods),
        ends=[LeaseEnd(name=name, closure=closure) for name, closure in ends],
        reason=reason,
    )


def set_pod_phase(kube: ControlPlane, namespace: str, pod: str, phase: str) -> None:
    kube.kubectl(
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


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane, namespace: str) -> list[str]:
    """Four 8-GPU KWOK nodes and a Budget whose envelope allows 24 GPUs at once."""
    names = add_nodes(crds, "bind", 4, **LABELS, **{"gpu.flavor": "H100-80GB"})
    apply(
        crds,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Budget",
            "metadata": {"name": "bt-budget"},
            "spec": {
                "owner": OWNER,
                "envelopes": [
                    {
                        "name": "main",
                        "flavor": "H100-80GB",
                        "selector": {"region": "bind-r"},
                        "concurrency": 24,
                    }
                ],
            },
        },
    )
    # No admission service may act on this module's Runs: the namespace speaks for nobody.
    crds.kubectl("annotate", "--overwrite", "namespace", namespace, f"{GROUP}/owners=nobody")
    return names


@pytest_asyncio.fixture(scope="module")
async def binder(
    crds: ControlPlane, nats_server: NatsServer, fleet: list[str]
) -> AsyncIterator[Binder]:
    api = await make_client(str(crds.kubeconfig))
    runtime = ServiceRuntime("binder", nats_url=nats_server.url)
    options = BinderOptions(tick_seconds=0.2, missing_pod_grace=timedelta(seconds=5))
    service = Binder(runtime, api, options)
    await asyncio.wait_for(service.start(), 60)
    try:
        yield service
    finally:
        await service.stop()
        await api.close()


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, binder: Binder) -> AsyncIterator[ServiceRuntime]:
    runtime = ServiceRuntime("binder-test-client", nats_url=nats_server.url)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest_asyncio.fixture(scope="module")
async def ledger(client: ServiceRuntime) -> AsyncIterator[list[LedgerEvent]]:
    """Every LEDGER event published while this module runs (core subscription)."""
    seen: list[LedgerEvent] = []

    async def on_msg(msg: Any) -> None:
        seen.append(decode(msg.data, LedgerEvent))

    sub = await client.nc.subscribe(LEDGER.name, cb=on_msg)
    try:
        yield seen
    finally:
        await sub.unsubscribe()


async def send(client: ServiceRuntime, req: CommitRequest) -> CommitReply:
    return await client.request(COMMIT, req, timeout=30)


# --------------------------------------------------------------------------- commits


async def test_commit_creates_leases_pods_and_a_headless_service(
    crds: ControlPlane,
    namespace: str,
    fleet: list[str],
    client: ServiceRuntime,
    ledger: list[LedgerEvent],
) -> None:
    run = create_run(crds, namespace, "alpha", 16)
    intent = plan(run, [(fleet[0], 8), (fleet[1], 8)])
    before = sample("jobtree_binder_commits_total", result="ok")
    reply = await send(client, commit_of(run, intent))
    assert reply.ok, reply.conflict
    assert sorted(reply.created) == sorted(li.name for li in intent.leases)
    assert sample("jobtree_binder_commits_total", result="ok") == before + 1

    leases = run_leases(crds, namespace, "alpha")
    assert sorted(le.metadata.name or "" for le in leases) == sorted(reply.created)
    for lease in leases:
        assert lease.status is None or not lease.status.closed
        assert lease.spec.paid_by_envelope == "main"
        assert lease.spec.paid_by_budget == "bt-budget"
        assert lease.spec.slice.gpus == 8
        assert lease.spec.run_ref.namespace == namespace

    pods = run_pods(crds, namespace, "alpha")
    by_rank = {p["metadata"]["labels"][f"{GROUP}/rank"]: p for p in pods}
    assert sorted(by_rank) == ["0", "1"]
    for rank, node in (("0", fleet[0]), ("1", fleet[1])):
        pod = by_rank[rank]
        assert pod["spec"]["nodeName"] == node
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["WORLD_SIZE"] == "2"
        assert env["RANK"] == rank
        assert env["MASTER_ADDR"] == f"alpha-g0-r0.alpha.{namespace}.svc"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
        assert pod["metadata"]["annotations"][ANNOTATION_LEASES]
    service = get_json(crds, "service", "-n", namespace, "alpha")
    assert service["spec"]["clusterIP"] == "None"

    def running() -> None:
        phases = {p["status"].get("phase") for p in run_pods(crds, namespace, "alpha")}
        assert phases == {"Running"}

    await eventually(running)

    def opened() -> None:
        names = {e.lease for e in ledger if e.kind == "opened"}
        assert names >= set(reply.created)

    await eventually(opened)


async def test_re_sending_a_commit_changes_nothing(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = get_json(crds, "runs." + GROUP, "-n", namespace, "alpha")
    leases = run_leases(crds, namespace, "alpha")
    # Lease names do not depend on the planning instant: a later re-plan names the same leases.
    intent = plan(run, [(fleet[0], 8), (fleet[1], 8)])
    before = sample("jobtree_binder_commits_total", result="noop")
    reply = await send(client, commit_of(run, intent))
    assert reply.ok, reply.conflict
    assert sorted(reply.created) == sorted(le.metadata.name or "" for le in leases)
    assert sample("jobtree_binder_commits_total", result="noop") == before + 1
    assert len(run_leases(crds, namespace, "alpha")) == 2
    assert len(run_pods(crds, namespace, "alpha")) == 2


async def test_a_commit_over_a_nodes_capacity_is_rejected_and_writes_nothing(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "beta", 4)
    before = sample("jobtree_binder_conflicts_total", reason="NodeCapacity")
    reply = await send(client, commit_of(run, plan(run, [(fleet[0], 4)])))
    assert not reply.ok
    assert reply.conflict.startswith("NodeCapacity: ")
    assert f"node {fleet[0]} has 8 GPUs, 8 held" in reply.conflict
    assert sample("jobtree_binder_conflicts_total", reason="NodeCapacity") == before + 1
    assert run_leases(crds, namespace, "beta") == []
    assert run_pods(crds, namespace, "beta") == []


async def test_a_commit_over_an_envelopes_concurrency_is_rejected(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "beta", 16)
    reply = await send(client, commit_of(run, plan(run, [(fleet[2], 8), (fleet[3], 8)])))
    assert not reply.ok
    assert reply.conflict.startswith("EnvelopeConcurrency: ")
    assert "allows 24 GPUs, 16 held; the commit adds 16" in reply.conflict
    assert run_leases(crds, namespace, "beta") == []
    assert run_pods(crds, namespace, "beta") == []


# --------------------------------------------------------------------------- lifecycle


async def test_all_pods_succeeding_closes_the_leases_completed(
    crds: ControlPlane, namespace: str, ledger: list[LedgerEvent]
) -> None:
    for pod in run_pods(crds, namespace, "alpha"):
        set_pod_phase(crds, namespace, pod["metadata"]["name"], "Succeeded")

    def completed() -> None:
        leases = run_leases(crds, namespace, "alpha")
        assert len(leases) == 2
        assert closures(leases) == {"Completed"}
        assert all(le.status and le.status.end_time for le in leases)

    await eventually(completed)
    closed = {e.lease: e.closure for e in ledger if e.kind == "closed"}
    names = {le.metadata.name for le in run_leases(crds, namespace, "alpha")}
    assert all(closed.get(str(n)) == "Completed" for n in names)
    # Terminated pods are kept so their logs stay readable.
    assert len(run_pods(crds, namespace, "alpha")) == 2


async def test_one_failed_pod_fails_the_whole_gang(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "gamma", 8)
    reply = await send(client, commit_of(run, plan(run, [(fleet[2], 4), (fleet[2], 4)])))
    assert reply.ok, reply.conflict

    def running() -> list[dict[str, Any]]:
        pods = run_pods(crds, namespace, "gamma")
        assert {p["status"].get("phase") for p in pods} == {"Running"}
        assert len(pods) == 2
        return pods

    pods = await eventually(running)
    set_pod_phase(crds, namespace, "gamma-g0-r1", "Failed")

    def failed() -> None:
        assert closures(run_leases(crds, namespace, "gamma")) == {"Fail"}

    await eventually(failed)

    def survivor_deleted() -> None:
        names = {p["metadata"]["name"] for p in run_pods(crds, namespace, "gamma")}
        assert names == {"gamma-g0-r1"}

    await eventually(survivor_deleted)
    assert pods  # both pods were running before the failure


async def test_a_rank_whose_pod_was_deleted_fails_the_gang(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    """Someone deletes a running rank's pod: the gang cannot go on, so once the grace passes
    (5 s in this module) its leases close ``Fail`` instead of holding the GPUs forever."""
    run = create_run(crds, namespace, "orphaned", 8)
    reply = await send(client, commit_of(run, plan(run, [(fleet[2], 8)])))
    assert reply.ok, reply.conflict

    def running() -> None:
        pods = run_pods(crds, namespace, "orphaned")
        assert [p["status"].get("phase") for p in pods] == ["Running"]

    await eventually(running)
    crds.kubectl("delete", "pod", "-n", namespace, "orphaned-g0-r0", "--wait=false")

    def failed() -> None:
        assert closures(run_leases(crds, namespace, "orphaned")) == {"Fail"}

    await eventually(failed, timeout=40)


async def test_a_requeued_gang_replaces_its_terminated_pods(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = get_json(crds, "runs." + GROUP, "-n", namespace, "gamma")
    old = {p["metadata"]["name"]: p["metadata"]["uid"] for p in run_pods(crds, namespace, "gamma")}
    intent = plan(run, [(fleet[2], 4), (fleet[2], 4)], attempt=1)
    reply = await send(client, commit_of(run, intent))
    assert reply.ok, reply.conflict

    def running_again() -> None:
        pods = run_pods(crds, namespace, "gamma")
        assert {p["status"].get("phase") for p in pods} == {"Running"}
        assert len(pods) == 2
        replaced = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}
        assert replaced["gamma-g0-r1"] != old["gamma-g0-r1"]

    await eventually(running_again)
    leases = run_leases(crds, namespace, "gamma")
    assert sorted(closures(leases), key=str) == ["Fail", None]
    for pod in run_pods(crds, namespace, "gamma"):
        set_pod_phase(crds, namespace, pod["metadata"]["name"], "Succeeded")
    await eventually(
        lambda: _assert_equal(closures(run_leases(crds, namespace, "gamma")), {"Fail", "Completed"})
    )


def _assert_equal(got: object, want: object) -> None:
    assert got == want


async def test_a_swap_commit_moves_the_ranks_pod_to_another_node(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "theta", 4)
    first = plan(run, [(fleet[1], 4)])
    assert (await send(client, commit_of(run, first))).ok
    await eventually(lambda: _assert_count(run_pods(crds, namespace, "theta"), 1))
    swap = plan(run, [(fleet[3], 4)], reason=LeaseReason.SWAP)
    reply = await send(client, commit_of(run, swap, ends=[(first.leases[0].name, "NodeFailure")]))
    assert reply.ok, reply.conflict
    assert reply.ended == [first.leases[0].name]

    def moved() -> None:
        pods = run_pods(crds, namespace, "theta")
        assert [p["spec"]["nodeName"] for p in pods] == [fleet[3]]
        assert pods[0]["status"].get("phase") == "Running"

    await eventually(moved)
    by_name = {le.metadata.name: le for le in run_leases(crds, namespace, "theta")}
    assert closures([by_name[first.leases[0].name]]) == {"NodeFailure"}
    assert closures([by_name[swap.leases[0].name]]) == {None}
    crds.kubectl("delete", "runs." + GROUP, "-n", namespace, "theta", "--wait=false")
    await eventually(lambda: _assert_count(run_pods(crds, namespace, "theta"), 0))


async def test_deleting_the_run_cancels_its_leases_and_keeps_them(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "delta", 8)
    reply = await send(client, commit_of(run, plan(run, [(fleet[2], 4), (fleet[3], 4)])))
    assert reply.ok, reply.conflict
    await eventually(lambda: _assert_count(run_pods(crds, namespace, "delta"), 2))
    crds.kubectl("delete", "runs." + GROUP, "-n", namespace, "delta", "--wait=false")

    def canceled() -> None:
        leases = run_leases(crds, namespace, "delta")
        assert len(leases) == 2  # the ledger outlives the Run
        assert closures(leases) == {"Canceled"}
        assert run_pods(crds, namespace, "delta") == []

    await eventually(canceled)


def _assert_count(items: list[Any], count: int) -> None:
    assert len(items) == count


async def test_walltime_closes_the_leases_time_limit(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "eps", 4, max_duration="3s")
    started = time.monotonic()
    reply = await send(client, commit_of(run, plan(run, [(fleet[3], 4)])))
    assert reply.ok, reply.conflict

    def timed_out() -> None:
        assert closures(run_leases(crds, namespace, "eps")) == {"TimeLimit"}

    await eventually(timed_out, timeout=20)
    assert time.monotonic() - started >= 2.5
    await eventually(lambda: _assert_count(run_pods(crds, namespace, "eps"), 0))


# --------------------------------------------------------------------------- reservations


async def test_gpus_promised_to_a_reservation_are_only_for_its_activation(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    owner_run = create_run(crds, namespace, "zeta", 8)
    apply(
        crds,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Reservation",
            "metadata": {
                "name": "zeta-resv",
                "namespace": namespace,
                "annotations": {f"{GROUP}/gpus": "8"},
            },
            "spec": {
                "runRef": {"name": "zeta"},
                "intendedSlice": {
                    "domain": {
                        "region": "bind-r",
                        "cluster": "bind-c",
                        "fabric.domain": "bind-f",
                    },
                    "nodes": [fleet[0]],
                },
                "payingEnvelope": ENVELOPE,
                "earliestStart": "2099-01-01T00:00:00Z",
            },
        },
    )
    # Another run may not take the promised node …
    other = create_run(crds, namespace, "eta", 8)

    async def protected() -> CommitReply:
        reply = await send(client, commit_of(other, plan(other, [(fleet[0], 8)])))
        assert not reply.ok
        return reply

    deadline = time.monotonic() + 10
    reply = await protected()
    while not reply.conflict.startswith("ProtectedReservation") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the binder's cache may not show the Reservation yet
        reply = await protected()
    assert reply.conflict.startswith("ProtectedReservation: "), reply.conflict
    assert run_leases(crds, namespace, "eta") == []
    # … but the reservation's own activation may.
    activation = commit_of(
        owner_run, plan(owner_run, [(fleet[0], 8)]), reason=f"Reservation:{namespace}/zeta-resv"
    )
    reply = await send(client, activation)
    assert reply.ok, reply.conflict
    assert len(run_leases(crds, namespace, "zeta")) == 1
    crds.kubectl("delete", "runs." + GROUP, "-n", namespace, "zeta", "--wait=false")
    await eventually(lambda: _assert_count(run_pods(crds, namespace, "zeta"), 0))


async def test_a_pod_the_api_server_refuses_fails_the_whole_commit(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "iota", 4)
    crds.kubectl(
        "patch",
        "runs." + GROUP,
        "-n",
        namespace,
        "iota",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"template": {"spec": {"containers": [{"name": "Not_A_Name"}]}}}}),
    )
    run = get_json(crds, "runs." + GROUP, "-n", namespace, "iota")
    reply = await send(client, commit_of(run, plan(run, [(fleet[1], 4)])))
    assert not reply.ok
    assert reply.conflict.startswith("InvalidPod: "), reply.conflict
    assert run_leases(crds, namespace, "iota") == []
    assert run_pods(crds, namespace, "iota") == []


async def test_pods_on_a_lost_node_are_deleted_outright(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = create_run(crds, namespace, "kappa", 4)
    intent = plan(run, [(fleet[2], 4)])
    assert (await send(client, commit_of(run, intent))).ok
    await eventually(lambda: _assert_count(run_pods(crds, namespace, "kappa"), 1))
    crds.kubectl("delete", "node", fleet[2])
    # The resolver's answer to the failure, when the run cannot be swapped: end the lease.
    reply = await send(
        client, commit_of(run, plan(run, []), ends=[(intent.leases[0].name, "NodeFailure")])
    )
    assert reply.ok, reply.conflict
    # No kubelet is left to confirm a graceful delete: the binder deletes the pod outright.
    await eventually(lambda: _assert_count(run_pods(crds, namespace, "kappa"), 0), timeout=10)
    assert closures(run_leases(crds, namespace, "kappa")) == {"NodeFailure"}


# --------------------------------------------------------------------------- the process


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def spawn_binder(
    kube: ControlPlane, nats: NatsServer, log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.binder",
                f"--nats-url={nats.url}",
                f"--kubeconfig={kube.kubeconfig}",
                f"--http-port={port}",
                "--log-format=text",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    return proc, port


async def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    def ready() -> None:
        assert proc.poll() is None, log.read_text()
        assert _status(f"http://127.0.0.1:{port}/readyz") == 200

    await eventually(ready, timeout=30, interval=0.2)


def _kill(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_binder_process_gets_ready_and_exits_cleanly_on_sigterm(
    binder: Binder, crds: ControlPlane, nats_server: NatsServer, tmp_path: Path
) -> None:
    # The in-process binder of this module stops first: one writer at a time.
    await binder.stop()
    proc, port = spawn_binder(crds, nats_server, tmp_path / "binder.log")
    try:
        await wait_ready(proc, port, tmp_path / "binder.log")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        assert b'jobtree_service_info{service="binder"' in body
        assert _status(f"http://127.0.0.1:{port}/healthz") == 200
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, (tmp_path / "binder.log").read_text()
    finally:
        _kill(proc)


async def test_with_leader_election_only_one_binder_writes_and_a_standby_takes_over(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    flags = ("--leader-elect", f"--leader-namespace={namespace}", "--leader-lease-seconds=3")
    first, first_port = spawn_binder(crds, nats_server, tmp_path / "a.log", *flags)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_ready(first, first_port, tmp_path / "a.log")
        second, second_port = spawn_binder(crds, nats_server, tmp_path / "b.log", *flags)
        probe = f"http://127.0.0.1:{second_port}/readyz"
        deadline = time.monotonic() + 30
        while (status := await asyncio.to_thread(_status, probe)) == 0:  # still starting up
            assert second.poll() is None, (tmp_path / "b.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "b.log").read_text()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a standby stays unready once it has seen the Lease held
        assert second.poll() is None, (tmp_path / "b.log").read_text()
        assert status == 503 and _status(probe) == 503  # standby
        holder = get_json(crds, "leases.coordination.k8s.io", "-n", namespace, "jobtree-binder")
        assert holder["spec"]["holderIdentity"]
        first.send_signal(signal.SIGTERM)  # a clean stop hands the Lease over at once
        assert await asyncio.to_thread(first.wait, 20) == 0
        await wait_ready(second, second_port, tmp_path / "b.log")
        after = get_json(crds, "leases.coordination.k8s.io", "-n", namespace, "jobtree-binder")
        assert after["spec"]["holderIdentity"] != holder["spec"]["holderIdentity"]
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 20) == 0
    finally:
        _kill(first, *([second] if second is not None else []))
