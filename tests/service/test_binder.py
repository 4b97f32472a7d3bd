"""The binder over a real nats-server and a real kube-apiserver with KWOK nodes.

The binder runs in-process; commits are sent over NATS exactly as admission and the resolver
send them, and every effect is read back from the API server with kubectl.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.binder.service import ANNOTATION_LEASES, Binder, BinderOptions
from shared.api import Lease as ApiLease
from shared.bus import (
    COMMIT,
    LEDGER,
    CommitReply,
    CommitRequest,
    LedgerEvent,
    ServiceRuntime,
    decode,
)
from shared.engine.bindplan import BindIntent
from shared.engine.model import LeaseReason
from shared.engine.state import Settings
from shared.kube.translate import rfc3339
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

OWNER = "org:bindtest"
ENVELOPE = "bt-budget/main"
LABELS = {"region": "bind-r", "cluster": "bind-c", "fabric.domain": "bind-f"}
DOMAIN = ("bind-r", "bind-c", "bind-f")


# --------------------------------------------------------------------------- helpers


def run_leases(kube: ControlPlane, namespace: str, run: str) -> list[ApiLease]:
    return [ApiLease.parse(item) for item in h.lease_items(kube, namespace, run)]


def closures(leases: Iterable[ApiLease]) -> set[str | None]:
    return {lease.status.closure_reason if lease.status else None for lease in leases}


def plan(
    run_obj: dict[str, Any],
    slices: list[tuple[str, int]],
    *,
    reason: LeaseReason = LeaseReason.START,
    attempt: int = 0,
) -> BindIntent:
    """A bind of one rank per (node, gpus), all paid by the test envelope."""
    return h.bind_intent(
        run_obj,
        slices,
        envelope=ENVELOPE,
        owner=OWNER,
        domain=DOMAIN,
        reason=reason,
        attempt=attempt,
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
    budget = h.budget_manifest("bt-budget", OWNER, "bind-r", 24)
    return h.fleet_with_budgets(crds, namespace, "bind", 4, LABELS, budget, owners=OWNER)


@pytest_asyncio.fixture(scope="module")
async def binder(
    crds: ControlPlane, nats_server: NatsServer, fleet: list[str]
) -> AsyncIterator[Binder]:
    runtime = ServiceRuntime(
        "binder", nats_url=nats_server.url, credentials=nats_server.credentials("binder")
    )
    options = BinderOptions(
        tick_seconds=0.2, settings=Settings(missing_pod_grace=timedelta(seconds=5))
    )
    async with h.in_process(crds, lambda api: Binder(runtime, api, options)) as service:
        yield service


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, binder: Binder) -> AsyncIterator[ServiceRuntime]:
    async with h.bus_client(nats_server, "binder-test-client") as runtime:
        yield runtime


@pytest_asyncio.fixture(scope="module")
async def ledger(client: ServiceRuntime) -> AsyncIterator[list[LedgerEvent]]:
    """Every LEDGER event published while this module runs (core subscription)."""
    async with h.collected(client, LEDGER.name, lambda msg: decode(msg.data, LedgerEvent)) as seen:
        yield seen


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
    run = h.create_run(crds, namespace, "alpha", OWNER, 16)
    intent = plan(run, [(fleet[0], 8), (fleet[1], 8)])
    before = h.sample("jobtree_binder_commits_total", result="ok")
    reply = await send(client, h.commit_request(run, intent))
    assert reply.ok, reply.conflict
    assert sorted(reply.created) == sorted(li.name for li in intent.leases)
    assert h.sample("jobtree_binder_commits_total", result="ok") == before + 1

    leases = run_leases(crds, namespace, "alpha")
    assert sorted(le.metadata.name or "" for le in leases) == sorted(reply.created)
    for lease in leases:
        assert lease.status is None or not lease.status.closed
        assert lease.spec.paid_by_envelope == "main"
        assert lease.spec.paid_by_budget == "bt-budget"
        assert lease.spec.slice.gpus == 8
        assert lease.spec.run_ref.namespace == namespace

    pods = h.pod_items(crds, namespace, "alpha")
    by_rank = {p["metadata"]["labels"][f"{h.GROUP}/rank"]: p for p in pods}
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
    service = h.get_json(crds, "service", "-n", namespace, "alpha")
    assert service["spec"]["clusterIP"] == "None"

    def running() -> None:
        phases = {p["status"].get("phase") for p in h.pod_items(crds, namespace, "alpha")}
        assert phases == {"Running"}

    await h.eventually(running)

    def opened() -> None:
        names = {e.lease for e in ledger if e.kind == "opened"}
        assert names >= set(reply.created)

    await h.eventually(opened)


async def test_re_sending_a_commit_changes_nothing(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.get_json(crds, h.RUNS, "-n", namespace, "alpha")
    leases = run_leases(crds, namespace, "alpha")
    # Lease names do not depend on the planning instant: a later re-plan names the same leases.
    intent = plan(run, [(fleet[0], 8), (fleet[1], 8)])
    before = h.sample("jobtree_binder_commits_total", result="noop")
    reply = await send(client, h.commit_request(run, intent))
    assert reply.ok, reply.conflict
    assert sorted(reply.created) == sorted(le.metadata.name or "" for le in leases)
    assert h.sample("jobtree_binder_commits_total", result="noop") == before + 1
    assert len(run_leases(crds, namespace, "alpha")) == 2
    assert len(h.pod_items(crds, namespace, "alpha")) == 2


async def test_a_commit_over_a_nodes_capacity_is_rejected_and_writes_nothing(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "beta", OWNER, 4)
    before = h.sample("jobtree_binder_conflicts_total", reason="NodeCapacity")
    reply = await send(client, h.commit_request(run, plan(run, [(fleet[0], 4)])))
    assert not reply.ok
    assert reply.conflict.startswith("NodeCapacity: ")
    assert f"node {fleet[0]} has 8 GPUs, 8 held" in reply.conflict
    assert h.sample("jobtree_binder_conflicts_total", reason="NodeCapacity") == before + 1
    assert run_leases(crds, namespace, "beta") == []
    assert h.pod_items(crds, namespace, "beta") == []


async def test_a_commit_over_an_envelopes_concurrency_is_rejected(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "beta", OWNER, 16)
    reply = await send(client, h.commit_request(run, plan(run, [(fleet[2], 8), (fleet[3], 8)])))
    assert not reply.ok
    assert reply.conflict.startswith("EnvelopeConcurrency: ")
    assert "allows 24 GPUs, 16 held; the commit adds 16" in reply.conflict
    assert run_leases(crds, namespace, "beta") == []
    assert h.pod_items(crds, namespace, "beta") == []


# --------------------------------------------------------------------------- lifecycle


async def test_all_pods_succeeding_closes_the_leases_completed(
    crds: ControlPlane, namespace: str, ledger: list[LedgerEvent]
) -> None:
    for pod in h.pod_items(crds, namespace, "alpha"):
        set_pod_phase(crds, namespace, pod["metadata"]["name"], "Succeeded")

    def completed() -> None:
        leases = run_leases(crds, namespace, "alpha")
        assert len(leases) == 2
        assert closures(leases) == {"Completed"}
        assert all(le.status and le.status.end_time for le in leases)

    await h.eventually(completed)
    closed = {e.lease: e.closure for e in ledger if e.kind == "closed"}
    names = {le.metadata.name for le in run_leases(crds, namespace, "alpha")}
    assert all(closed.get(str(n)) == "Completed" for n in names)
    # Terminated pods are kept so their logs stay readable.
    assert len(h.pod_items(crds, namespace, "alpha")) == 2


async def test_one_failed_pod_fails_the_whole_gang(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "gamma", OWNER, 8)
    reply = await send(client, h.commit_request(run, plan(run, [(fleet[2], 4), (fleet[2], 4)])))
    assert reply.ok, reply.conflict

    def running() -> list[dict[str, Any]]:
        pods = h.pod_items(crds, namespace, "gamma")
        assert {p["status"].get("phase") for p in pods} == {"Running"}
        assert len(pods) == 2
        return pods

    pods = await h.eventually(running)
    set_pod_phase(crds, namespace, "gamma-g0-r1", "Failed")

    def failed() -> None:
        assert closures(run_leases(crds, namespace, "gamma")) == {"Fail"}

    await h.eventually(failed)

    def survivor_deleted() -> None:
        names = {p["metadata"]["name"] for p in h.pod_items(crds, namespace, "gamma")}
        assert names == {"gamma-g0-r1"}

    await h.eventually(survivor_deleted)
    assert pods  # both pods were running before the failure


async def test_a_rank_whose_pod_was_deleted_fails_the_gang(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    """Someone deletes a running rank's pod: the gang cannot go on, so once the grace passes
    (5 s in this module) its leases close ``Fail`` instead of holding the GPUs forever."""
    run = h.create_run(crds, namespace, "orphaned", OWNER, 8)
    reply = await send(client, h.commit_request(run, plan(run, [(fleet[2], 8)])))
    assert reply.ok, reply.conflict

    def running() -> None:
        pods = h.pod_items(crds, namespace, "orphaned")
        assert [p["status"].get("phase") for p in pods] == ["Running"]

    await h.eventually(running)
    crds.kubectl("delete", "pod", "-n", namespace, "orphaned-g0-r0", "--wait=false")

    def failed() -> None:
        assert closures(run_leases(crds, namespace, "orphaned")) == {"Fail"}

    await h.eventually(failed, timeout=40)


async def test_a_requeued_gang_replaces_its_terminated_pods(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.get_json(crds, h.RUNS, "-n", namespace, "gamma")
    old = {
        p["metadata"]["name"]: p["metadata"]["uid"] for p in h.pod_items(crds, namespace, "gamma")
    }
    intent = plan(run, [(fleet[2], 4), (fleet[2], 4)], attempt=1)
    reply = await send(client, h.commit_request(run, intent))
    assert reply.ok, reply.conflict

    def running_again() -> None:
        pods = h.pod_items(crds, namespace, "gamma")
        assert {p["status"].get("phase") for p in pods} == {"Running"}
        assert len(pods) == 2
        replaced = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}
        assert replaced["gamma-g0-r1"] != old["gamma-g0-r1"]

    await h.eventually(running_again)
    leases = run_leases(crds, namespace, "gamma")
    assert sorted(closures(leases), key=str) == ["Fail", None]
    for pod in h.pod_items(crds, namespace, "gamma"):
        set_pod_phase(crds, namespace, pod["metadata"]["name"], "Succeeded")
    await h.eventually(
        lambda: _assert_equal(closures(run_leases(crds, namespace, "gamma")), {"Fail", "Completed"})
    )


def _assert_equal(got: object, want: object) -> None:
    assert got == want


async def test_a_swap_commit_moves_the_ranks_pod_to_another_node(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "theta", OWNER, 4)
    first = plan(run, [(fleet[1], 4)])
    assert (await send(client, h.commit_request(run, first))).ok
    await h.eventually(lambda: _assert_count(h.pod_items(crds, namespace, "theta"), 1))
    swap = plan(run, [(fleet[3], 4)], reason=LeaseReason.SWAP)
    moving = h.commit_request(
        run, swap, reason=f"NodeFailure:{fleet[1]}", ends=[(first.leases[0].name, "NodeFailure")]
    )
    # A swap is justified only by a node the binder itself sees failed.
    refused = await send(client, moving)
    assert refused.conflict.startswith("UnjustifiedEnd: "), refused.conflict
    crds.kubectl("delete", "node", fleet[1])
    reply = await send(client, moving)
    assert reply.ok, reply.conflict
    assert reply.ended == [first.leases[0].name]

    def moved() -> None:
        pods = h.pod_items(crds, namespace, "theta")
        assert [p["spec"]["nodeName"] for p in pods] == [fleet[3]]
        assert pods[0]["status"].get("phase") == "Running"

    await h.eventually(moved)
    by_name = {le.metadata.name: le for le in run_leases(crds, namespace, "theta")}
    assert closures([by_name[first.leases[0].name]]) == {"NodeFailure"}
    assert closures([by_name[swap.leases[0].name]]) == {None}
    crds.kubectl("delete", h.RUNS, "-n", namespace, "theta", "--wait=false")
    await h.eventually(lambda: _assert_count(h.pod_items(crds, namespace, "theta"), 0))
    h.add_nodes(crds, "bind", 4, **LABELS, **{"gpu.flavor": h.FLAVOR})


async def test_deleting_the_run_cancels_its_leases_and_keeps_them(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "delta", OWNER, 8)
    reply = await send(client, h.commit_request(run, plan(run, [(fleet[2], 4), (fleet[3], 4)])))
    assert reply.ok, reply.conflict
    await h.eventually(lambda: _assert_count(h.pod_items(crds, namespace, "delta"), 2))
    crds.kubectl("delete", h.RUNS, "-n", namespace, "delta", "--wait=false")

    def canceled() -> None:
        leases = run_leases(crds, namespace, "delta")
        assert len(leases) == 2  # the ledger outlives the Run
        assert closures(leases) == {"Canceled"}
        assert h.pod_items(crds, namespace, "delta") == []

    await h.eventually(canceled)


def _assert_count(items: list[Any], count: int) -> None:
    assert len(items) == count


async def test_walltime_closes_the_leases_time_limit(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "eps", OWNER, 4, max_duration="3s")
    started = time.monotonic()
    reply = await send(client, h.commit_request(run, plan(run, [(fleet[3], 4)])))
    assert reply.ok, reply.conflict

    def timed_out() -> None:
        assert closures(run_leases(crds, namespace, "eps")) == {"TimeLimit"}

    await h.eventually(timed_out, timeout=20)
    assert time.monotonic() - started >= 2.5
    await h.eventually(lambda: _assert_count(h.pod_items(crds, namespace, "eps"), 0))


# --------------------------------------------------------------------------- reservations


async def test_gpus_promised_to_a_reservation_are_only_for_its_activation(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    owner_run = h.create_run(crds, namespace, "zeta", OWNER, 8)
    h.apply(
        crds,
        h.reservation_manifest(
            namespace,
            "zeta-resv",
            run="zeta",
            labels=LABELS,
            nodes=[fleet[0]],
            gpus=8,
            paying_envelope=ENVELOPE,
            earliest_start=rfc3339(datetime.now(UTC).replace(microsecond=0)),
        ),
    )
    # Another run may not take the promised node …
    other = h.create_run(crds, namespace, "eta", OWNER, 8)

    async def protected() -> CommitReply:
        reply = await send(client, h.commit_request(other, plan(other, [(fleet[0], 8)])))
        assert not reply.ok
        return reply

    deadline = time.monotonic() + 10
    reply = await protected()
    while not reply.conflict.startswith("ProtectedReservation") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the binder's cache may not show the Reservation yet
        reply = await protected()
    assert reply.conflict.startswith("ProtectedReservation: "), reply.conflict
    assert run_leases(crds, namespace, "eta") == []
    # … but the reservation's own activation may, once it is Active (and only then).
    activation = h.commit_request(
        owner_run, plan(owner_run, [(fleet[0], 8)]), reason=f"Reservation:{namespace}/zeta-resv"
    )
    reply = await send(client, activation)
    assert reply.conflict.startswith("UnverifiedReservation: "), reply.conflict
    crds.kubectl(
        "patch", h.RESERVATIONS, "zeta-resv", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": {"state": "Active"}}),
    )  # fmt: skip
    reply = await send(client, activation)
    assert reply.ok, reply.conflict
    assert len(run_leases(crds, namespace, "zeta")) == 1
    crds.kubectl("delete", h.RUNS, "-n", namespace, "zeta", "--wait=false")
    await h.eventually(lambda: _assert_count(h.pod_items(crds, namespace, "zeta"), 0))


async def test_a_pod_the_api_server_refuses_fails_the_whole_commit(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "iota", OWNER, 4)
    crds.kubectl(
        "patch",
        h.RUNS,
        "-n",
        namespace,
        "iota",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"template": {"spec": {"containers": [{"name": "Not_A_Name"}]}}}}),
    )
    run = h.get_json(crds, h.RUNS, "-n", namespace, "iota")
    reply = await send(client, h.commit_request(run, plan(run, [(fleet[1], 4)])))
    assert not reply.ok
    assert reply.conflict.startswith("InvalidPod: "), reply.conflict
    assert run_leases(crds, namespace, "iota") == []
    assert h.pod_items(crds, namespace, "iota") == []


async def test_pods_on_a_lost_node_are_deleted_outright(
    crds: ControlPlane, namespace: str, fleet: list[str], client: ServiceRuntime
) -> None:
    run = h.create_run(crds, namespace, "kappa", OWNER, 4)
    intent = plan(run, [(fleet[2], 4)])
    assert (await send(client, h.commit_request(run, intent))).ok
    await h.eventually(lambda: _assert_count(h.pod_items(crds, namespace, "kappa"), 1))
    crds.kubectl("delete", "node", fleet[2])
    # The resolver's answer to the failure, when the run cannot be swapped: end the lease.
    reply = await send(
        client,
        h.commit_request(
            run,
            plan(run, []),
            reason=f"NodeFailure:{fleet[2]}",
            ends=[(intent.leases[0].name, "NodeFailure")],
        ),
    )
    assert reply.ok, reply.conflict
    # No kubelet is left to confirm a graceful delete: the binder deletes the pod outright.
    await h.eventually(lambda: _assert_count(h.pod_items(crds, namespace, "kappa"), 0), timeout=10)
    assert closures(run_leases(crds, namespace, "kappa")) == {"NodeFailure"}


# --------------------------------------------------------------------------- the process


def _status(url: str) -> int:
    return h.http_get(url)[0]


async def test_the_binder_process_gets_ready_and_exits_cleanly_on_sigterm(
    binder: Binder, crds: ControlPlane, nats_server: NatsServer, tmp_path: Path
) -> None:
    # The in-process binder of this module stops first: one writer at a time.
    await binder.stop()
    proc, port = h.spawn_service("binder", crds, nats_server, tmp_path / "binder.log")
    try:
        await h.wait_ready(proc, port, tmp_path / "binder.log")
        code, body = h.http_get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert 'jobtree_service_info{service="binder"' in body
        assert _status(f"http://127.0.0.1:{port}/healthz") == 200
        code = await h.terminate(proc)
        assert code == 0, (tmp_path / "binder.log").read_text()
    finally:
        h.kill(proc)


async def test_with_leader_election_only_one_binder_writes_and_a_standby_takes_over(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    flags = ("--leader-elect", f"--leader-namespace={namespace}", "--leader-lease-seconds=3")
    first, first_port = h.spawn_service("binder", crds, nats_server, tmp_path / "a.log", *flags)
    second: subprocess.Popen[bytes] | None = None
    try:
        await h.wait_ready(first, first_port, tmp_path / "a.log")
        second, second_port = h.spawn_service(
            "binder", crds, nats_server, tmp_path / "b.log", *flags
        )
        probe = f"http://127.0.0.1:{second_port}/readyz"
        deadline = time.monotonic() + 30
        while (status := await asyncio.to_thread(_status, probe)) == 0:  # still starting up
            assert second.poll() is None, (tmp_path / "b.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "b.log").read_text()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a standby stays unready once it has seen the Lease held
        assert second.poll() is None, (tmp_path / "b.log").read_text()
        assert status == 503 and _status(probe) == 503  # standby
        holder = h.get_json(crds, "leases.coordination.k8s.io", "-n", namespace, "jobtree-binder")
        assert holder["spec"]["holderIdentity"]
        # A clean stop hands the Lease over at once.
        assert await h.terminate(first) == 0
        await h.wait_ready(second, second_port, tmp_path / "b.log")
        after = h.get_json(crds, "leases.coordination.k8s.io", "-n", namespace, "jobtree-binder")
        assert after["spec"]["holderIdentity"] != holder["spec"]["holderIdentity"]
        assert await h.terminate(second) == 0
    finally:
        h.kill(first, second)
