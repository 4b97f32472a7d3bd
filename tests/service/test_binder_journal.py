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
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import msgspec.structs
import nats
import pytest
import pytest_asyncio

from services.binder.journal import Journal
from services.binder.service import Binder, BinderOptions
from shared.bus import COMMIT, CommitRequest, ServiceRuntime
from shared.engine.bindplan import BindIntent
from shared.engine.model import LeaseReason
from shared.kube.translate import lease_manifest
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

OWNER = "org:journaltest"
ENVELOPE = "jt-budget/main"
LABELS = {"region": "jrnl-r", "cluster": "jrnl-c", "fabric.domain": "jrnl-f"}
DOMAIN = ("jrnl-r", "jrnl-c", "jrnl-f")


def replays(result: str) -> float:
    return h.sample("jobtree_binder_journal_replays_total", result=result)


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane, namespace: str) -> list[str]:
    budget = h.budget_manifest("jt-budget", OWNER, "jrnl-r", 96)
    return h.fleet_with_budgets(crds, namespace, "jrnl", 9, LABELS, budget, owners=OWNER)


@pytest_asyncio.fixture(scope="module")
async def journal(nats_server: NatsServer) -> AsyncIterator[Journal]:
    nc = await nats.connect(nats_server.url, **nats_server.connect_options("binder"))
    journal = Journal(nc)
    await journal.open()
    try:
        yield journal
    finally:
        await nc.close()


@asynccontextmanager
async def binder_serving(
    crds: ControlPlane, nats_server: NatsServer, options: BinderOptions
) -> AsyncIterator[None]:
    """A fresh in-process binder, h.started (serving only once its journal is replayed)."""
    async with h.kube_api(crds) as api:
        binder = Binder(
            ServiceRuntime(
                "binder", nats_url=nats_server.url, credentials=nats_server.credentials("binder")
            ),
            api,
            options,
        )
        async with h.started(binder, timeout=None):
            yield


def commit_for(
    run_obj: dict[str, Any],
    nodes: list[str],
    *,
    first_rank: int = 0,
    reason: LeaseReason = LeaseReason.START,
) -> tuple[CommitRequest, BindIntent]:
    """One 8-GPU rank per node, paid by the test envelope: what admission would propose."""
    intent = h.bind_intent(
        run_obj,
        [(node, 8) for node in nodes],
        envelope=ENVELOPE,
        owner=OWNER,
        domain=DOMAIN,
        reason=reason,
        first_rank=first_rank,
    )
    return h.commit_request(run_obj, intent, reason=reason.value), intent


def pods_of(kube: ControlPlane, namespace: str, run: str) -> dict[str, str]:
    """Rank → node of the Run's pods."""
    pods = h.pod_items(kube, namespace, run)
    return {p["metadata"]["labels"][f"{h.GROUP}/rank"]: p["spec"]["nodeName"] for p in pods}


async def test_a_binder_completes_the_commit_a_crashed_binder_left_half_written(
    crds: ControlPlane,
    nats_server: NatsServer,
    namespace: str,
    fleet: list[str],
    journal: Journal,
) -> None:
    run = h.create_run(crds, namespace, "crashed", OWNER, 16)
    commit, intent = commit_for(run, fleet[:2])
    # What a binder killed after its first Lease write leaves: the journal entry, one Lease.
    await journal.record(commit)
    first = lease_manifest(intent.leases[0], run_uid=run["metadata"]["uid"], gen=1)
    crds.kubectl("create", "-f", "-", input=json.dumps(first))
    assert len(h.lease_items(crds, namespace, "crashed")) == 1
    assert pods_of(crds, namespace, "crashed") == {}
    # And a journaled commit whose Run is gone by the time a binder starts.
    gone = h.create_run(crds, namespace, "gone", OWNER, 8)
    gone_commit, _ = commit_for(gone, fleet[2:3])
    await journal.record(gone_commit)
    crds.kubectl("delete", h.RUNS, "-n", namespace, "gone")
    # And an entry someone else wrote into the journal: a back-dated start. Replays are checked
    # like any commit, at the instant the NATS server stored the entry.
    injected = h.create_run(crds, namespace, "injected", OWNER, 8)
    injected_commit, _ = commit_for(injected, fleet[3:4])
    backdated = [
        dataclasses.replace(lease, start=lease.start - timedelta(hours=3))
        for lease in injected_commit.leases
    ]
    await journal.record(msgspec.structs.replace(injected_commit, leases=backdated))
    completed, dropped = replays("completed"), replays("dropped")

    # Serves only once the journal is replayed.
    async with binder_serving(crds, nats_server, BinderOptions(tick_seconds=0.2)):
        leases = h.lease_items(crds, namespace, "crashed")
        assert sorted(le["metadata"]["name"] for le in leases) == sorted(
            li.name for li in intent.leases
        )
        assert all(not (le.get("status") or {}).get("closed") for le in leases), leases
        assert pods_of(crds, namespace, "crashed") == {"0": fleet[0], "1": fleet[1]}
        assert h.lease_items(crds, namespace, "gone") == [], "a gone Run's commit was applied"
        assert h.lease_items(crds, namespace, "injected") == [], "an injected entry was applied"
        assert h.pod_items(crds, namespace, "injected") == []
        assert await journal.pending() == []
        assert replays("completed") == completed + 1
        assert replays("dropped") == dropped + 2

        # The proposer re-sending the commit finds it applied; an applied commit leaves no entry.
        async with h.bus_client(nats_server, "journal-test-client") as client:
            reply = await client.request(COMMIT, commit, timeout=30)
            assert reply.ok and sorted(reply.created) == sorted(li.name for li in intent.leases)
            fresh = h.create_run(crds, namespace, "fresh", OWNER, 8)
            fresh_commit, _ = commit_for(fresh, fleet[2:3])
            applied = await client.request(COMMIT, fresh_commit, timeout=30)
            assert applied.ok, applied
            assert pods_of(crds, namespace, "fresh") == {"0": fleet[2]}
            assert await journal.pending() == []


async def test_a_commit_starting_a_live_rank_on_another_node_is_rejected(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, fleet: list[str]
) -> None:
    """A grow numbered on a view that missed the Run's newest Leases reuses a live rank: the
    binder refuses it instead of replacing that rank's pod with a second incarnation."""
    async with (
        binder_serving(crds, nats_server, BinderOptions(tick_seconds=0.2)),
        h.bus_client(nats_server, "rank-test-client") as client,
    ):
        run = h.create_run(crds, namespace, "ranks", OWNER, 24)
        start, _ = commit_for(run, fleet[3:5])
        assert (await client.request(COMMIT, start, timeout=30)).ok
        stale_grow, _ = commit_for(run, fleet[5:6], first_rank=1, reason=LeaseReason.GROW)
        reply = await client.request(COMMIT, stale_grow, timeout=30)
        assert not reply.ok and reply.conflict.startswith("Invalid: rank 1 "), reply
        assert pods_of(crds, namespace, "ranks") == {"0": fleet[3], "1": fleet[4]}
        grow, _ = commit_for(run, fleet[5:6], first_rank=2, reason=LeaseReason.GROW)
        assert (await client.request(COMMIT, grow, timeout=30)).ok
        assert pods_of(crds, namespace, "ranks") == {"0": fleet[3], "1": fleet[4], "2": fleet[5]}


async def test_commits_written_side_by_side_never_overbook_a_node(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, fleet: list[str]
) -> None:
    """Commits for different Runs are written concurrently, but each is checked against the
    ones accepted before it: of three Runs racing for one node exactly one gets it, while Runs
    on other nodes all bind."""
    options = BinderOptions(tick_seconds=0.2, commit_concurrency=8)
    async with (
        binder_serving(crds, nats_server, options),
        h.bus_client(nats_server, "overlap-test-client") as client,
    ):
        apart = [h.create_run(crds, namespace, f"apart{i}", OWNER, 8) for i in range(2)]
        racing = [h.create_run(crds, namespace, f"race{i}", OWNER, 8) for i in range(3)]
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
            for lease in h.lease_items(crds, namespace, run["metadata"]["name"])
            if lease["spec"]["slice"]["nodes"] == [fleet[8]]
        ]
        assert len(held) == 1, held
        for i, run in enumerate(apart):
            assert pods_of(crds, namespace, run["metadata"]["name"]) == {"0": fleet[6 + i]}
