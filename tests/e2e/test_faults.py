"""Faults in the middle of flow 1: a crashed service, a restarted NATS, a stale plan.

Flow 1 is the administrator guide's first Run: both sample budgets, then ``run-128-groups``
(128 GPUs, 16 ranks of 8 GPUs: 96 paid by ``west-h100-nv-a``, 32 borrowed from the vision lab).

- Each service in turn is killed with SIGKILL right after the Run is applied, then restarted.
  Kubernetes is the source of truth and commits are idempotent, so the flow still completes: the
  Run is Running on 128 GPUs with exactly one Lease and one pod per rank, no GPU double-booked,
  no Run lost. The binder is also killed as the gang's first Lease reaches the API server (its
  journal lets the next binder finish what it was writing).
- nats-server is stopped and started again on the same port right after the apply: the services
  reconnect (JetStream streams are on disk) and the flow completes the same way.
- The binder rejects a stale plan: a COMMIT computed (by a real ``ServiceRuntime`` client, the
  way admission does it) for nodes another commit has since filled gets ``ok=False`` with a
  ``NodeCapacity`` conflict and writes nothing; the Run still ends Running through admission.
  And when admission itself commits a stale plan (two plans for the same nodes while the binder
  was stopped and the packer restarted in between), the binder rejects the second and admission
  recomputes on its own.
"""

from __future__ import annotations

import asyncio
import re
import select
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from services.local.stack import LocalStack
from shared.bus import (
    COMMIT,
    PLAN,
    CommitReply,
    CommitRequest,
    PlanRequest,
    RunRef,
    ServiceRuntime,
)
from shared.engine.bindplan import BindIntent, bind_plan
from shared.engine.cover import CoverDenied, cover
from shared.engine.model import LeaseReason, RunKey
from shared.engine.pack import GroupPlacement, PlacedSlice, Placement
from shared.engine.state import Settings
from shared.kube.cache import ClusterCache
from shared.kube.client import make_client
from shared.localenv.services import SERVICES

from .conftest import (
    BUDGETS,
    LEASES,
    apply_sample,
    create_namespace,
    describe_leases,
    eventually,
    get_json,
    run_object,
)

RUN = "run-128-groups"
RUN_GPUS = 128
RANKS = 16
RANK = re.compile(r"RANK\[(\d+)\]")
NV_A = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"}
RUN_UID_LABEL = "rq.davidlangworthy.io/run-uid"


# --------------------------------------------------------------------------- checks


def lease_is_open(lease: dict[str, Any]) -> bool:
    return not (lease.get("status") or {}).get("closed")


def ledger_problems(stack: LocalStack) -> list[str]:
    """Over-committed nodes, envelopes over their caps, duplicate (run, rank, node) Leases."""
    capacity = {
        n["metadata"]["name"]: int(n["status"]["allocatable"].get("nvidia.com/gpu", 0))
        for n in get_json(stack, "nodes")["items"]
    }
    caps = {
        (b["metadata"]["name"], e["name"]): int(e["concurrency"])
        for b in get_json(stack, BUDGETS)["items"]
        for e in b["spec"]["envelopes"]
    }
    held: dict[str, Counter[str]] = defaultdict(Counter)
    paid: Counter[tuple[str, str]] = Counter()
    slots: Counter[tuple[str, str, str, int, str]] = Counter()
    for lease in get_json(stack, LEASES)["items"]:
        if not lease_is_open(lease):
            continue
        spec = lease["spec"]
        node = spec["slice"]["nodes"][0]
        held[node][spec["slice"]["role"]] += int(spec["slice"]["gpus"])
        paid[(spec["paidByBudget"], spec["paidByEnvelope"])] += int(spec["slice"]["gpus"])
        rank = RANK.search(" ".join(spec.get("compPath") or []))
        uid = lease["metadata"].get("labels", {}).get(RUN_UID_LABEL, "")
        run = spec["runRef"]
        slots[(run["namespace"], run["name"], uid, int(rank.group(1)) if rank else -1, node)] += 1
    problems = []
    for node, roles in sorted(held.items()):
        used = roles["Active"] + max(roles["Spare"], roles["Borrowed"])
        if used > capacity.get(node, 0):
            problems.append(f"node {node}: {used} GPUs leased of {capacity.get(node, 0)}")
    problems += [
        f"envelope {key}: {gpus} GPUs, cap {caps.get(key)}"
        for key, gpus in sorted(paid.items())
        if gpus > caps.get(key, 0)
    ]
    problems += [f"{n} open Leases for {slot}" for slot, n in sorted(slots.items()) if n > 1]
    return problems


def live_pods(stack: LocalStack, namespace: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = get_json(stack, "-n", namespace, "pods")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def start_flow_1(stack: LocalStack, namespace: str) -> str:
    """Budgets and ``run-128-groups`` exactly as the guide applies them; returns the Run's uid."""
    create_namespace(stack, namespace, owners="org:ai:rai:sys")
    apply_sample(stack, "budgets/budget-west-h100.yaml")
    apply_sample(stack, "budgets/budget-vision-lending.yaml")
    apply_sample(stack, "runs/run-128-groups.yaml", namespace)
    return str(run_object(stack, namespace, RUN)["metadata"]["uid"])


def assert_flow_1_completed(stack: LocalStack, namespace: str, uid: str) -> None:
    """Running on 128 GPUs with one Lease and one pod per rank; nothing duplicated or lost."""

    def running() -> None:
        run = run_object(stack, namespace, RUN)
        assert run["metadata"]["uid"] == uid, "the Run was replaced"
        status = run.get("status") or {}
        assert status.get("phase") == "Running", f"Run status: {status}"
        assert (status.get("width") or {}).get("allocated") == RUN_GPUS, f"Run status: {status}"

    eventually(running, timeout=90)

    def pods_running() -> list[dict[str, Any]]:
        pods = live_pods(stack, namespace)
        phases = {p["metadata"]["name"]: (p.get("status") or {}).get("phase") for p in pods}
        assert len(pods) == RANKS, f"pods: {phases}"
        assert set(phases.values()) == {"Running"}, f"pods: {phases}"
        return pods

    pods = eventually(pods_running, timeout=60)

    leases = [
        le
        for le in get_json(stack, LEASES, "-l", f"rq.davidlangworthy.io/run={RUN}")["items"]
        if le["spec"]["runRef"]["namespace"] == namespace
    ]
    detail = describe_leases(leases)
    # One commit, applied once: no Lease was written twice or written and thrown away.
    assert all(lease_is_open(le) for le in leases), detail
    assert len(leases) == RANKS, detail
    assert sum(int(le["spec"]["slice"]["gpus"]) for le in leases) == RUN_GPUS, detail
    slots = Counter(
        (
            int(RANK.search(" ".join(le["spec"]["compPath"])).group(1)),  # type: ignore[union-attr]
            le["spec"]["slice"]["nodes"][0],
        )
        for le in leases
    )
    assert sorted(r for r, _ in slots) == list(range(RANKS)), detail
    assert len({node for _, node in slots}) == RANKS, f"two ranks share a node: {detail}"
    assert {le["metadata"]["labels"].get(RUN_UID_LABEL) for le in leases} == {uid}, detail
    starts = {le["spec"]["interval"]["start"] for le in leases}
    assert len(starts) == 1, f"one gang, one commit: starts {starts}"

    # One pod per rank, on its rank's leased node, owned by this Run.
    by_rank = {rank: node for rank, node in slots}
    names = Counter(p["metadata"]["name"] for p in pods)
    assert max(names.values()) == 1, names
    for pod in pods:
        labels = pod["metadata"]["labels"]
        rank = int(labels["rq.davidlangworthy.io/rank"])
        assert pod["spec"]["nodeName"] == by_rank[rank], (pod["metadata"]["name"], by_rank)
        refs = pod["metadata"].get("ownerReferences") or []
        assert [r["uid"] for r in refs if r["kind"] == "Run"] == [uid], refs

    problems = ledger_problems(stack)
    assert not problems, "; ".join(problems)


@pytest.fixture
def healthy(clean: LocalStack) -> Iterator[LocalStack]:
    """The clean stack; afterwards every service (and NATS) is running and ready again, so a
    failed fault test never leaves a broken stack to the tests after it."""
    yield clean
    services = clean.services
    for name in SERVICES:
        proc = services.process(name)
        if proc.alive():
            services.kill(name, signal.SIGCONT)
        else:
            services.restart(name)
    nats = clean.nats
    if nats is not None and getattr(nats, "_proc", None) is None:
        nats.start()
    services.wait_ready(120)


# --------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("service", SERVICES)
def test_sigkill_mid_flow_1(healthy: LocalStack, service: str) -> None:
    stack = healthy
    namespace = f"e2e-kill-{service}"
    old_pid = stack.services.process(service).pid
    uid = start_flow_1(stack, namespace)
    code = stack.services.kill(service, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"{service} exited with {code}"
    # A while without it: requests to it fail or time out, its watches miss events.
    time.sleep(1.0)
    stack.services.restart(service)
    stack.services.wait_ready(90, names=[service])
    assert stack.services.process(service).pid != old_pid
    assert_flow_1_completed(stack, namespace, uid)
    stack.services.wait_ready(30)


def test_sigkill_binder_mid_commit(healthy: LocalStack) -> None:
    """The binder dies as its first Lease of the gang reaches the API server, i.e. in the middle
    of writing the commit: the next binder completes it from its journal."""
    stack = healthy
    namespace = "e2e-kill-mid-commit"
    create_namespace(stack, namespace, owners="org:ai:rai:sys")
    watch = subprocess.Popen(
        [
            str(stack.control_plane.bin_dir / "kubectl"),
            "get",
            LEASES,
            "-l",
            f"rq.davidlangworthy.io/run={RUN},rq.davidlangworthy.io/namespace={namespace}",
            "--watch-only",
            "-o",
            "name",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=stack.env(),
    )
    try:
        time.sleep(1.0)  # the watch is established
        uid = start_flow_1(stack, namespace)
        assert watch.stdout is not None
        ready, _, _ = select.select([watch.stdout], [], [], 60)
        assert ready, "no Lease was written within 60s"
        watch.stdout.readline()
        stack.services.kill("binder", signal.SIGKILL)
    finally:
        watch.kill()
        watch.wait()
    written = len(
        get_json(stack, LEASES, "-l", f"rq.davidlangworthy.io/namespace={namespace}")["items"]
    )
    pods = len(get_json(stack, "-n", namespace, "pods")["items"])
    print(f"binder killed with {written} of {RANKS} Leases and {pods} pods written")
    stack.services.restart("binder")
    stack.services.wait_ready(90, names=["binder"])
    assert_flow_1_completed(stack, namespace, uid)


def test_nats_restart_mid_flow_1(healthy: LocalStack) -> None:
    stack = healthy
    nats = stack.nats
    assert nats is not None
    port = nats.port
    uid = start_flow_1(stack, "e2e-nats-restart")
    nats.stop()
    time.sleep(1.0)
    nats.start()
    assert nats.port == port and stack.nats_url.endswith(f":{port}")
    stack.services.wait_ready(60)
    assert_flow_1_completed(stack, "e2e-nats-restart", uid)
    for name in SERVICES:
        metrics = stack.services.metrics(name)
        reconnects = re.search(r"^jobtree_nats_reconnects_total\{[^}]*\} (\S+)", metrics, re.M)
        assert reconnects and float(reconnects.group(1)) >= 1, f"{name} never reconnected"
        connected = re.search(r"^jobtree_nats_connected\{[^}]*\} (\S+)", metrics, re.M)
        assert connected and float(connected.group(1)) == 1, f"{name} not connected again"


# --------------------------------------------------------------------------- stale plans


def fixed_run(name: str, namespace: str, gpus: int = 32) -> dict[str, Any]:
    """A fixed-width Run of one ``gpus`` group in nv-a, paid by ``west-h100-nv-a``."""
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "owner": "org:ai:rai:sys",
            "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus},
            "locality": {"groupGPUs": gpus, "selector": NV_A},
            "runtime": {"maxDuration": "1h"},
        },
    }


def apply_runs(stack: LocalStack, *runs: dict[str, Any]) -> None:
    stack.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(runs))


def run_nodes(stack: LocalStack, namespace: str, run: str) -> set[str]:
    return {
        le["spec"]["slice"]["nodes"][0]
        for le in get_json(stack, LEASES, "-l", f"rq.davidlangworthy.io/run={run}")["items"]
        if le["spec"]["runRef"]["namespace"] == namespace and lease_is_open(le)
    }


def wait_running(stack: LocalStack, namespace: str, run: str, gpus: int) -> None:
    def running() -> None:
        status = run_object(stack, namespace, run).get("status") or {}
        assert status.get("phase") == "Running", f"{run}: {status}"
        assert (status.get("width") or {}).get("allocated") == gpus, f"{run}: {status}"

    eventually(running, timeout=60)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def propose(
    runtime: ServiceRuntime,
    cache: ClusterCache,
    key: RunKey,
    *,
    placement_of: BindIntent | None = None,
) -> tuple[CommitRequest, BindIntent]:
    """What admission proposes for a Run: cover on a snapshot, PLAN at the packer, bind plan.

    ``placement_of``: bind on the nodes of that (same-shaped) intent instead of asking the packer.
    """
    settings = Settings()
    deadline = time.monotonic() + 30
    while (request := cache.run_request(key)) is None:
        assert time.monotonic() < deadline, f"the cache never showed Run {key}"
        await asyncio.sleep(0.1)
    obj = cache.run_object(key)
    assert obj is not None
    generation = int(obj["metadata"].get("generation") or 0)
    state = cache.snapshot(datetime.now(UTC), settings)
    funding = cover(
        request,
        state.family,
        state.usage,
        now=state.now,
        default_duration=settings.default_duration,
    )
    assert not isinstance(funding, CoverDenied), funding
    ref = RunRef(namespace=key[0], name=key[1], uid=request.uid, generation=generation)
    reply = await runtime.request(PLAN, PlanRequest(run=ref, request=request, funding=funding))
    assert reply.placement is not None, reply
    placement = reply.placement
    if placement_of is not None:
        placement = Placement(
            groups=(
                GroupPlacement(
                    index=0,
                    domain=placement.groups[0].domain,
                    slices=tuple(
                        PlacedSlice(
                            node=li.node,
                            gpus=li.gpus,
                            role=li.role,
                            group=li.group,
                            rank=li.rank,
                            envelope=li.envelope,
                            payer_owner=li.payer_owner,
                            funding=li.funding,
                        )
                        for li in placement_of.leases
                    ),
                ),
            )
        )
    intent = bind_plan(
        request,
        placement,
        now=datetime.now(UTC),
        reason=LeaseReason.START,
        generation=generation,
    )
    envelopes = [lease.envelope for lease in intent.leases]
    commit = CommitRequest(
        key=intent.key,
        run=ref,
        version=reply.version,
        leases=list(intent.leases),
        pods=list(intent.pods),
        budget_of={e: e.rpartition("/")[0] for e in envelopes},
        reason="Start",
    )
    return commit, intent


async def test_binder_rejects_a_stale_plan(healthy: LocalStack) -> None:
    stack = healthy
    namespace = "e2e-stale-plan"
    create_namespace(stack, namespace, owners="org:ai:rai:sys")
    apply_sample(stack, "budgets/budget-west-h100.yaml")
    conflicts_before = metric_value(
        stack.services.metrics("binder"), "jobtree_binder_conflicts_total", reason="NodeCapacity"
    )
    api = await make_client(str(stack.kubeconfig))
    cache = ClusterCache(api)
    runtime = ServiceRuntime(
        "admission", nats_url=stack.nats_url, credentials=stack.nats.credentials("admission")
    )
    # Admission is frozen so that only this client proposes, in the order the test chooses.
    stack.services.kill("admission", signal.SIGSTOP)
    try:
        await runtime.start()
        await cache.start()
        await cache.wait_ready(timeout=30)
        apply_runs(stack, fixed_run("stale", namespace), fixed_run("filler", namespace))
        # The stale proposal: planned by the packer for the empty nodes it saw.
        stale, stale_intent = await propose(runtime, cache, (namespace, "stale"))
        stale_nodes = {lease.node for lease in stale_intent.leases}
        # Another commit fills exactly those nodes before the stale one arrives (the packer
        # itself would now steer a second plan elsewhere: it assumes what it handed out).
        filler, filler_intent = await propose(
            runtime, cache, (namespace, "filler"), placement_of=stale_intent
        )
        filler_nodes = {lease.node for lease in filler_intent.leases}
        assert filler_nodes == stale_nodes, (stale_nodes, filler_nodes)

        first = await runtime.request(COMMIT, filler, timeout=20)
        assert first == CommitReply(
            ok=True,
            created=[lease.name for lease in filler_intent.leases],
            ended=[],
        ), first
        reply = await runtime.request(COMMIT, stale, timeout=20)
        assert not reply.ok, f"a plan for nodes another commit filled was accepted: {reply}"
        assert reply.conflict.startswith("NodeCapacity:"), reply
        assert not reply.created, reply
        # Re-sending the commit that won is harmless (idempotent names).
        again = await runtime.request(COMMIT, filler, timeout=20)
        assert again.ok and again.created == first.created, again
        assert not run_nodes(stack, namespace, "stale"), "the rejected commit wrote Leases"
    finally:
        stack.services.kill("admission", signal.SIGCONT)
        await runtime.stop()
        await cache.stop()
        await api.close()

    after = metric_value(
        stack.services.metrics("binder"), "jobtree_binder_conflicts_total", reason="NodeCapacity"
    )
    assert after >= conflicts_before + 1
    # Admission takes over: the filler is Running on what it holds, the stale Run is recomputed.
    wait_running(stack, namespace, "filler", 32)
    wait_running(stack, namespace, "stale", 32)
    filler_held = run_nodes(stack, namespace, "filler")
    stale_held = run_nodes(stack, namespace, "stale")
    assert filler_held == filler_nodes
    assert stale_held and not stale_held & filler_held, (stale_held, filler_held)
    problems = ledger_problems(stack)
    assert not problems, "; ".join(problems)


def test_admission_recomputes_after_a_stale_commit(healthy: LocalStack) -> None:
    """Two plans for the same nodes reach the binder back to back: the binder was stopped while
    admission planned both, and the packer restarted in between (so it no longer remembered the
    placement it had handed out first). The binder rejects the second; admission's retry places
    it elsewhere."""
    stack = healthy
    namespace = "e2e-stale-retry"
    create_namespace(stack, namespace, owners="org:ai:rai:sys")
    apply_sample(stack, "budgets/budget-west-h100.yaml")
    services = stack.services

    def fits() -> float:
        return metric_value(services.metrics("packer"), "jobtree_packer_plans_total", result="fit")

    def planned(more_than: float) -> float:
        def check() -> float:
            now = fits()
            assert now > more_than, "admission has not planned the Run yet"
            return now

        return eventually(check, timeout=30, interval=0.1)

    log = services.log_path("binder")
    binder_log_start = log.stat().st_size
    admission_log = services.log_path("admission")
    admission_log_start = admission_log.stat().st_size
    services.kill("binder", signal.SIGSTOP)
    try:
        base = fits()
        apply_runs(stack, fixed_run("first", namespace))
        planned(base)
        time.sleep(0.5)  # its COMMIT is now waiting at the stopped binder
        services.kill("packer", signal.SIGKILL)
        services.restart("packer")
        services.wait_ready(15, names=["packer"])
        apply_runs(stack, fixed_run("second", namespace))
        planned(0)  # the new packer's first fit
        time.sleep(0.5)
    finally:
        services.kill("binder", signal.SIGCONT)

    wait_running(stack, namespace, "first", 32)
    wait_running(stack, namespace, "second", 32)
    first, second = run_nodes(stack, namespace, "first"), run_nodes(stack, namespace, "second")
    assert first and second and not first & second, (first, second)

    with log.open() as fh:
        fh.seek(binder_log_start)
        rejected = [
            line for line in fh if '"commit rejected"' in line and f"{namespace}/second" in line
        ]
    assert rejected and "NodeCapacity" in rejected[0], (
        "the binder never rejected the second, stale plan"
    )
    with admission_log.open() as fh:
        fh.seek(admission_log_start)
        retried = [line for line in fh if '"bind conflict"' in line and "second" in line]
    assert retried, "admission never saw the conflict it recomputed after"
    problems = ledger_problems(stack)
    assert not problems, "; ".join(problems)
