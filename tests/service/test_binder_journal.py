"""The binder's commit journal, over a real nats-server and a real kube-apiserver with KWOK nodes.

A binder killed in the middle of a commit leaves part of the gang written: the journal entry it
stored before writing, and the Leases it created before it died, but not the rest of them and
none of the pods. The next binder to start serving must complete that commit from the journal,
not leave GPUs leased without pods. The crash's aftermath is set up exactly as the binder leaves
it (the journal entry through ``Journal.record``, the first Lease through the API server), then a
real ``Binder`` starts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from services.binder.journal import Journal
from services.binder.service import Binder, BinderOptions
from shared.bus import COMMIT, CommitRequest, RunRef, ServiceRuntime
from shared.engine.bindplan import BindIntent, bind_plan
from shared.engine.model import FundingKind, LeaseReason, Role
from shared.engine.pack import GroupPlacement, PlacedSlice, Placement
from shared.kube.client import make_client
from shared.kube.translate import lease_manifest, run_request
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from .conftest import add_nodes

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

GROUP = "rq.davidlangworthy.io"
OWNER = "org:journaltest"
ENVELOPE = "jt-budget/main"
LABELS = {"region": "jrnl-r", "cluster": "jrnl-c", "fabric.domain": "jrnl-f"}
DOMAIN = ("jrnl-r", "jrnl-c", "jrnl-f")


def get_json(kube: ControlPlane, *args: str) -> Any:
    return json.loads(kube.kubectl("get", *args, "-o", "json").stdout)


def replays(result: str) -> float:
    return (
        REGISTRY.get_sample_value("jobtree_binder_journal_replays_total", {"result": result}) or 0
    )


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane, namespace: str) -> list[str]:
    names = add_nodes(crds, "jrnl", 9, **LABELS, **{"gpu.flavor": "H100-80GB"})
    budget = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Budget",
        "metadata": {"name": "jt-budget"},
        "spec": {
            "owner": OWNER,
            "envelopes": [
                {
                    "name": "main",
                    "flavor": "H100-80GB",
                    "selector": {"region": "jrnl-r"},
                    "concurrency": 96,
                }
            ],
        },
    }
    crds.kubectl("apply", "-f", "-", input=json.dumps(budget))
    crds.kubectl("annotate", "--overwrite", "namespace", namespace, f"{GROUP}/owners=nobody")
    return names


@pytest_asyncio.fixture(scope="module")
async def journal(nats_server: NatsServer) -> AsyncIterator[Journal]:
    nc = await nats.connect(nats_server.url)
    journal = Journal(nc)
    await journal.open()
    try:
        yield journal
    finally:
        await nc.close()


def create_run(kube: ControlPlane, namespace: str, name: str, gpus: int) -> dict[str, Any]:
    run = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"owner": OWNER, "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus}},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(run))
    obj: dict[str, Any] = get_json(kube, f"runs.{GROUP}", "-n", namespace, name)
    return obj


def commit_for(
    run_obj: dict[str, Any],
    nodes: list[str],
    *,
    first_rank: int = 0,
    reason: LeaseReason = LeaseReason.START,
) -> tuple[CommitRequest, BindIntent]:
    """One 8-GPU rank per node, paid by the test envelope: what admission would propose."""
    request = run_request(run_obj)
    slices = tuple(
        PlacedSlice(
            node=node,
            gpus=8,
            role=Role.ACTIVE,
            group=0,
            rank=first_rank + rank,
            envelope=ENVELOPE,
            payer_owner=OWNER,
            funding=FundingKind.OWNED,
        )
        for rank, node in enumerate(nodes)
    )
    placement = Placement(groups=(GroupPlacement(index=0, domain=DOMAIN, slices=slices),))
    intent = bind_plan(request, placement, now=datetime.now(UTC), reason=reason)
    meta = run_obj["metadata"]
    commit = CommitRequest(
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
        reason=reason.value,
    )
    return commit, intent


def leases_of(kube: ControlPlane, namespace: str, run: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(kube, f"leases.{GROUP}", "-l", f"{GROUP}/run={run}")[
        "items"
    ]
    return [i for i in items if i["spec"]["runRef"]["namespace"] == namespace]


def pods_of(kube: ControlPlane, namespace: str, run: str) -> dict[str, str]:
    """Rank → node of the Run's pods."""
    pods = get_json(kube, "pods", "-n", namespace, "-l", f"{GROUP}/run={run}")["items"]
    return {p["metadata"]["labels"][f"{GROUP}/rank"]: p["spec"]["nodeName"] for p in pods}


async def test_a_binder_completes_the_commit_a_crashed_binder_left_half_written(
    crds: ControlPlane,
    nats_server: NatsServer,
    namespace: str,
    fleet: list[str],
    journal: Journal,
) -> None:
    run = create_run(crds, namespace, "crashed", 16)
    commit, intent = commit_for(run, fleet[:2])
    # What a binder killed after its first Lease write leaves: the journal entry, one Lease.
    await journal.record(commit)
    first = lease_manifest(intent.leases[0], run_uid=run["metadata"]["uid"], gen=1)
    crds.kubectl("create", "-f", "-", input=json.dumps(first))
    assert len(leases_of(crds, namespace, "crashed")) == 1
    assert pods_of(crds, namespace, "crashed") == {}
    # And a journaled commit whose Run is gone by the time a binder starts.
    gone = create_run(crds, namespace, "gone", 8)
    gone_commit, _ = commit_for(gone, fleet[2:3])
    await journal.record(gone_commit)
    crds.kubectl("delete", f"runs.{GROUP}", "-n", namespace, "gone")
    completed, dropped = replays("completed"), replays("dropped")

    api = await make_client(str(crds.kubeconfig))
    binder = Binder(
        ServiceRuntime("binder", nats_url=nats_server.url), api, BinderOptions(tick_seconds=0.2)
    )
    client = ServiceRuntime("journal-test-client", nats_url=nats_server.url)
    try:
        await binder.start()  # serves only once the journal is replayed
        leases = leases_of(crds, namespace, "crashed")
        assert sorted(le["metadata"]["name"] for le in leases) == sorted(
            li.name for li in intent.leases
        )
        assert all(not (le.get("status") or {}).get("closed") for le in leases), leases
        assert pods_of(crds, namespace, "crashed") == {"0": fleet[0], "1": fleet[1]}
        assert leases_of(crds, namespace, "gone") == [], "a gone Run's commit was applied"
        assert await journal.pending() == []
        assert replays("completed") == completed + 1
        assert replays("dropped") == dropped + 1

        # The proposer re-sending the commit finds it applied; an applied commit leaves no entry.
        await client.start()
        reply = await client.request(COMMIT, commit, timeout=30)
        assert reply.ok and sorted(reply.created) == sorted(li.name for li in intent.leases)
        fresh = create_run(crds, namespace, "fresh", 8)
        fresh_commit, _ = commit_for(fresh, fleet[2:3])
        applied = await client.request(COMMIT, fresh_commit, timeout=30)
        assert applied.ok, applied
        assert pods_of(crds, namespace, "fresh") == {"0": fleet[2]}
        assert await journal.pending() == []
    finally:
        await client.stop()
        await binder.stop()
        await api.close()


async def test_a_commit_starting_a_live_rank_on_another_node_is_rejected(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, fleet: list[str]
) -> None:
    """A grow numbered on a view that missed the Run's newest Leases reuses a live rank: the
    binder refuses it instead of replacing that rank's pod with a second incarnation."""
    api = await make_client(str(crds.kubeconfig))
    binder = Binder(
        ServiceRuntime("binder", nats_url=nats_server.url), api, BinderOptions(tick_seconds=0.2)
    )
    client = ServiceRuntime("rank-test-client", nats_url=nats_server.url)
    try:
        await binder.start()
        await client.start()
        run = create_run(crds, namespace, "ranks", 24)
        start, _ = commit_for(run, fleet[3:5])
        assert (await client.request(COMMIT, start, timeout=30)).ok
        stale_grow, _ = commit_for(run, fleet[5:6], first_rank=1, reason=LeaseReason.GROW)
        reply = await client.request(COMMIT, stale_grow, timeout=30)
        assert not reply.ok and reply.conflict.startswith("Invalid: rank 1 "), reply
        assert pods_of(crds, namespace, "ranks") == {"0": fleet[3], "1": fleet[4]}
        grow, _ = commit_for(run, fleet[5:6], first_rank=2, reason=LeaseReason.GROW)
        assert (await client.request(COMMIT, grow, timeout=30)).ok
        assert pods_of(crds, namespace, "ranks") == {"0": fleet[3], "1": fleet[4], "2": fleet[5]}
    finally:
        await client.stop()
        await binder.stop()
        await api.close()


async def test_commits_written_side_by_side_never_overbook_a_node(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, fleet: list[str]
) -> None:
    """Commits for different Runs are written concurrently, but each is checked against the
    ones accepted before it: of three Runs racing for one node exactly one gets it, while Runs
    on other nodes all bind."""
    api = await make_client(str(crds.kubeconfig))
    binder = Binder(
        ServiceRuntime("binder", nats_url=nats_server.url),
        api,
        BinderOptions(tick_seconds=0.2, commit_concurrency=8),
    )
    client = ServiceRuntime("overlap-test-client", nats_url=nats_server.url)
    try:
        await binder.start()
        await client.start()
        apart = [create_run(crds, namespace, f"apart{i}", 8) for i in range(2)]
        racing = [create_run(crds, namespace, f"race{i}", 8) for i in range(3)]
        commits = [commit_for(run, [fleet[6 + i]])[0] for i, run in enumerate(apart)]
        commits += [commit_for(run, [fleet[8]])[0] for run in racing]
        replies = await asyncio.gather(
            *(client.request(COMMIT, commit, timeout=30) for commit in commits)
        )
        assert all(reply.ok for reply in replies[:2]), replies
        won = [reply for reply in replies[2:] if reply.ok]
        lost = [reply for reply in replies[2:] if not reply.ok]
        assert len(won) == 1, replies
        assert all(r.conflict.startswith("NodeCapacity: ") for r in lost), lost
        held = [
            lease
            for run in (*apart, *racing)
            for lease in leases_of(crds, namespace, run["metadata"]["name"])
            if lease["spec"]["slice"]["nodes"] == [fleet[8]]
        ]
        assert len(held) == 1, held
        for i, run in enumerate(apart):
            assert pods_of(crds, namespace, run["metadata"]["name"]) == {"0": fleet[6 + i]}
    finally:
        await client.stop()
        await binder.stop()
        await api.close()
