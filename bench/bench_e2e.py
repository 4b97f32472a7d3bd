"""End to end on a KWOK fleet: submit → bound latency of 64-GPU Runs through the five services.

``python -m bench.bench_e2e`` (also run by ``make bench``) starts its own whole local Jobtree
(``services.local.stack.running_stack``: nats-server, etcd + kube-apiserver + KWOK, the CRDs and
the five service processes), adds a fleet of 1,000 KWOK nodes × 8 GPUs in batches, then:

* ``e2e_fleet_create_1000_nodes`` — how long creating the nodes takes (batches of
  ``BATCH`` concurrent creates), until KWOK reports all Ready, and until the packer's topology
  shows them all.
* ``e2e_apiserver_write_rate`` — the physical ceiling on this machine, in the same run: ConfigMaps
  created as fast as ``CONCURRENCY`` concurrent clients can, objects/s.
* ``e2e_submit_to_bound_64gpu`` — Runs of 64 GPUs (one group, inside one 16-node fabric domain)
  offered open-loop at ``RATE`` runs/s for ``DURATION`` s; bound = the Run's ``status.phase`` is
  ``Running`` (seen through a watch, an ``Informer``). p50/p99 of submit → bound, the offered and
  achieved submit rates and the sustained bind rate. Each bound Run is deleted again so the fleet
  (125 such Runs at once) never fills; the submitter holds back when ``MAX_IN_FLIGHT`` Runs are
  submitted and not yet deleted, and reports how often it had to (a system that cannot keep up
  shows as an achieved rate below the offered one, not as Reservations).
* ``e2e_submit_to_bound_64gpu_below_saturation`` — the same at ``STEADY_RATE`` (default 70 % of
  the sustained rate just measured) for ``STEADY_DURATION`` s: the latency of a system that keeps
  up, without the queueing that an offered rate above its capacity adds.
* ``e2e_peak_rss_<process>`` — peak resident memory (``VmHWM``) of each service process
  (and of nats-server, etcd, kube-apiserver and KWOK) over the whole run.

Every size is an environment variable (``JOBTREE_BENCH_E2E_<NAME>``, see ``Sizes``); the whole
benchmark is bounded by ``TIMEOUT`` seconds (default 600).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from bench.common import emit, load, machine, percentile
from services.local.stack import LocalStack, running_stack
from shared.api import GROUP
from shared.control.tenancy import OWNERS_ANNOTATION
from shared.kube.client import KubeError, make_client, request
from shared.kube.informer import Informer, Obj
from shared.kube.resources import RUNS
from shared.localenv.fleet import node_manifest

T = TypeVar("T")
FLAVOR = "H100-80GB"
NAMESPACE = "bench-e2e"
OWNER = "org:bench:e2e"
DOMAIN_NODES = 16


@dataclass(frozen=True)
class Sizes:
    """Every knob, from ``JOBTREE_BENCH_E2E_<FIELD NAME IN CAPITALS>``."""

    nodes: int = 1000
    gpus_per_node: int = 8
    batch: int = 100
    """Nodes created concurrently per batch."""
    run_gpus: int = 64
    rate: float = 20.0
    """Offered Runs per second."""
    duration: float = 60.0
    """Seconds of offered load."""
    drain: float = 60.0
    """Seconds to wait for the last submitted Runs to bind."""
    max_in_flight: int = 0
    """Runs submitted and not yet deleted; 0 = 80 % of what the fleet holds at once."""
    steady_rate: float = 0.0
    """Runs/s of the second phase; 0 = 70 % of the sustained rate the first phase measured."""
    steady_duration: float = 45.0
    configmaps: int = 2000
    concurrency: int = 64
    """Concurrent clients for the ConfigMap write rate."""
    timeout: float = 600.0

    @classmethod
    def from_env(cls) -> Sizes:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"JOBTREE_BENCH_E2E_{f.name.upper()}")
            if raw:
                values[f.name] = float(raw) if f.type == "float" else int(raw)
        return cls(**values)

    @property
    def in_flight(self) -> int:
        if self.max_in_flight:
            return self.max_in_flight
        fits = self.nodes * self.gpus_per_node // self.run_gpus
        return max(1, int(fits * 0.8))


def log(message: str) -> None:
    print(f"bench_e2e: {message}", file=sys.stderr, flush=True)


def line(figure: str, **values: Any) -> None:
    """One JSON line for a figure that is not a latency distribution."""
    print(
        json.dumps({"figure": figure, **values, "machine": machine(), "load": load()}), flush=True
    )


async def bounded(concurrency: int, calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


# --------------------------------------------------------------------------- the fleet


def bench_node(index: int, gpus: int) -> dict[str, Any]:
    domain = index // DOMAIN_NODES
    labels = {
        "region": "us-west",
        "cluster": "bench",
        "fabric.domain": f"bd-{domain:03d}",
        "rack": f"br-{domain:03d}-{(index % DOMAIN_NODES) // 4}",
        "gpu.flavor": FLAVOR,
    }
    return node_manifest(f"bench-{index:04d}", labels, gpus=gpus)


async def ready_nodes(api: Any) -> int:
    listed = await request(
        api, "GET", "/api/v1/nodes", query=[("labelSelector", "cluster=bench")], timeout=60
    )
    count = 0
    for node in listed.get("items", []):
        for cond in (node.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready" and cond.get("status") == "True":
                count += 1
    return count


def packer_topology(stack: LocalStack) -> float:
    with urllib.request.urlopen(f"{stack.services.url('packer')}/metrics", timeout=5) as resp:
        for raw in resp.read().decode().splitlines():
            if raw.startswith("jobtree_packer_topology_nodes "):
                return float(raw.split()[1])
    return 0.0


async def create_fleet(api: Any, stack: LocalStack, sizes: Sizes) -> None:
    started = time.perf_counter()
    batch_ms: list[float] = []
    for first in range(0, sizes.nodes, sizes.batch):
        t = time.perf_counter()
        bodies = [
            bench_node(i, sizes.gpus_per_node)
            for i in range(first, min(sizes.nodes, first + sizes.batch))
        ]
        await asyncio.gather(*(request(api, "POST", "/api/v1/nodes", body=b) for b in bodies))
        batch_ms.append((time.perf_counter() - t) * 1000)
    created = time.perf_counter() - started
    log(f"{sizes.nodes} nodes created in {created:.1f}s; waiting for Ready")
    while await ready_nodes(api) < sizes.nodes:
        await asyncio.sleep(1.0)
    ready = time.perf_counter() - started
    expected = sizes.nodes + len(stack.node_names)
    while packer_topology(stack) < expected:
        await asyncio.sleep(0.5)
    seen = time.perf_counter() - started
    emit(
        f"e2e_fleet_create_{sizes.nodes}_nodes",
        batch_ms,
        unit="ms per batch",
        batch=sizes.batch,
        nodes=sizes.nodes,
        gpus_per_node=sizes.gpus_per_node,
        created_s=round(created, 2),
        all_ready_s=round(ready, 2),
        in_packer_topology_s=round(seen, 2),
        nodes_per_s=round(sizes.nodes / created, 1),
    )


# --------------------------------------------------------------------------- the ceiling


async def apiserver_write_rate(api: Any, sizes: Sizes) -> None:
    path = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
    samples: list[float] = []

    def create(i: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"ceiling-{i:06d}"},
                "data": {"payload": "x" * 512},
            }
            t = time.perf_counter()
            await request(api, "POST", path, body=body)
            samples.append((time.perf_counter() - t) * 1000)

        return call

    started = time.perf_counter()
    await bounded(sizes.concurrency, [create(i) for i in range(sizes.configmaps)])
    elapsed = time.perf_counter() - started
    emit(
        "e2e_apiserver_write_rate",
        samples,
        unit="ms per create",
        objects=sizes.configmaps,
        concurrency=sizes.concurrency,
        objects_per_s=round(sizes.configmaps / elapsed, 1),
        what="ConfigMap creates (512 B) straight to kube-apiserver: the physical write ceiling",
    )
    await request(api, "DELETE", path, timeout=120)


# --------------------------------------------------------------------------- the runs


@dataclass
class Tally:
    submitted: dict[str, float] = field(default_factory=dict)
    bound: dict[str, float] = field(default_factory=dict)
    deleting: set[str] = field(default_factory=set)
    failed_submits: int = 0
    throttled: int = 0
    in_flight: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)


def run_body(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "owner": OWNER,
            "resources": {"gpuType": FLAVOR, "totalGPUs": gpus},
            "locality": {"groupGPUs": gpus},
            "runtime": {"maxDuration": "1h"},
        },
    }


async def offered_load(
    api: Any, sizes: Sizes, *, rate: float, duration: float, figure: str, prefix: str
) -> float:
    """Offer Runs at ``rate`` for ``duration`` s, emit ``figure``, return the sustained rate."""
    tally = Tally()
    runs_path = RUNS.path(NAMESPACE)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def delete(name: str) -> None:
        try:
            await request(api, "DELETE", RUNS.path(NAMESPACE, name))
        except KubeError as exc:
            log(f"delete {name}: {exc}")
        tally.in_flight -= 1
        tally.freed.set()

    def on_run(event: str, obj: Obj, old: Obj | None) -> None:
        name = str((obj.get("metadata") or {}).get("name"))
        phase = (obj.get("status") or {}).get("phase")
        if event == "DELETED" or name not in tally.submitted or name in tally.bound:
            return
        if phase == "Running":
            tally.bound[name] = time.monotonic()
            tally.deleting.add(name)
            spawn(delete(name))

    informer = Informer(api, RUNS, namespace=NAMESPACE)
    informer.add_listener(on_run)
    watching = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.ready.wait(), 60)

    async def submit(name: str) -> None:
        try:
            await request(api, "POST", runs_path, body=run_body(name, sizes.run_gpus))
        except KubeError as exc:
            tally.failed_submits += 1
            tally.submitted.pop(name, None)
            tally.in_flight -= 1
            log(f"submit {name}: {exc}")

    count = max(1, int(rate * duration))
    log(
        f"offering {count} Runs of {sizes.run_gpus} GPUs at {rate:.2f}/s "
        f"({sizes.in_flight} in flight at most)"
    )
    start = time.monotonic()
    give_up = start + duration + sizes.drain
    for i in range(count):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if tally.in_flight >= sizes.in_flight:
            tally.throttled += 1
            while tally.in_flight >= sizes.in_flight and time.monotonic() < give_up:
                tally.freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tally.freed.wait(), 1.0)
        if time.monotonic() >= give_up:
            log(f"stopped offering after {i} Runs: the fleet stayed full")
            break
        tally.in_flight += 1
        name = f"{prefix}-{i:05d}"
        tally.submitted[name] = time.monotonic()  # before the task runs: the drain counts it
        spawn(submit(name))
    submit_window = time.monotonic() - start
    deadline = time.monotonic() + sizes.drain
    while len(tally.bound) < len(tally.submitted) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    informer.stop()
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await watching
    if tasks:
        await asyncio.wait(tasks, timeout=60)

    latencies = [
        (tally.bound[n] - t) * 1000 for n, t in tally.submitted.items() if n in tally.bound
    ]
    unbound = len(tally.submitted) - len(latencies)
    last = max(tally.bound.values(), default=start)
    # Sustained: Runs bound per second between the first submission and the last bind.
    sustained = len(latencies) / max(1e-9, last - start)
    if not latencies:
        line(figure, bound=0, submitted=len(tally.submitted))
        return 0.0
    emit(
        figure,
        latencies,
        offered_rate=round(rate, 2),
        achieved_submit_rate=round(len(tally.submitted) / submit_window, 2),
        sustained_bind_rate=round(sustained, 2),
        submitted=len(tally.submitted),
        bound=len(latencies),
        unbound_after_drain=unbound,
        failed_submits=tally.failed_submits,
        throttled_submits=tally.throttled,
        max_in_flight=sizes.in_flight,
        nodes=sizes.nodes,
        gpus_per_node=sizes.gpus_per_node,
        p90_ms=round(percentile(latencies, 90), 1),
        max_ms=round(max(latencies), 1),
    )
    return sustained


async def wait_no_runs(api: Any, timeout: float = 120.0) -> None:
    """Until every Run of the previous phase is gone (their Leases closed with them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = await request(api, "GET", RUNS.path(NAMESPACE), timeout=60)
        if not listed.get("items"):
            await asyncio.sleep(2.0)
            return
        await asyncio.sleep(1.0)
    log("runs of the previous phase still present; measuring anyway")


# --------------------------------------------------------------------------- memory


def vm_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for raw in status:
                if raw.startswith(f"{field_name}:"):
                    return int(raw.split()[1])
    except OSError:
        return None
    return None


def memory(stack: LocalStack) -> None:
    services = stack.services.pids()
    for name, pid in stack.processes().items():
        peak = vm_kb(pid, "VmHWM")
        rss = vm_kb(pid, "VmRSS")
        if peak is None:
            continue
        kind = "service" if name in services else "server"
        line(
            f"e2e_peak_rss_{name}",
            peak_rss_mb=round(peak / 1024, 1),
            rss_at_end_mb=round((rss or 0) / 1024, 1),
            process=kind,
            pid=pid,
        )


# --------------------------------------------------------------------------- main


async def measure(stack: LocalStack, sizes: Sizes) -> None:
    api = await make_client(str(stack.kubeconfig))
    try:
        await request(
            api,
            "POST",
            "/api/v1/namespaces",
            body={  # tenancy is closed: the namespace is authorised for the bench's owner
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": NAMESPACE, "annotations": {OWNERS_ANNOTATION: OWNER}},
            },
        )
        gpus = sizes.nodes * sizes.gpus_per_node
        budget = {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Budget",
            "metadata": {"name": "bench-e2e"},
            "spec": {
                "owner": OWNER,
                "envelopes": [
                    {
                        "name": "fleet",
                        "flavor": FLAVOR,
                        "selector": {"region": "us-west", "cluster": "bench"},
                        "concurrency": gpus,
                    }
                ],
            },
        }
        await request(api, "POST", f"/apis/{GROUP}/v1/budgets", body=budget)
        log(f"creating {sizes.nodes} KWOK nodes in batches of {sizes.batch}")
        await create_fleet(api, stack, sizes)
        log(f"kube-apiserver write ceiling: {sizes.configmaps} ConfigMaps")
        await apiserver_write_rate(api, sizes)
        sustained = await offered_load(
            api,
            sizes,
            rate=sizes.rate,
            duration=sizes.duration,
            figure=f"e2e_submit_to_bound_{sizes.run_gpus}gpu",
            prefix="r",
        )
        await wait_no_runs(api)
        steady = sizes.steady_rate or max(0.5, round(0.7 * sustained, 2))
        log(f"latency below saturation: {steady:.2f} Runs/s")
        await offered_load(
            api,
            sizes,
            rate=steady,
            duration=sizes.steady_duration,
            figure=f"e2e_submit_to_bound_{sizes.run_gpus}gpu_below_saturation",
            prefix="s",
        )
    finally:
        await api.close()
    memory(stack)


def main() -> int:
    sizes = Sizes.from_env()
    keep = os.environ.get("JOBTREE_BENCH_E2E_WORKDIR")
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="jobtree-bench-e2e-"))
    started = time.monotonic()
    log(f"sizes {sizes}; workdir {workdir}")
    try:
        with running_stack(workdir, nodes_per_domain=1, ready_timeout=180.0, progress=log) as stack:
            left = sizes.timeout - (time.monotonic() - started) - 30
            asyncio.run(asyncio.wait_for(measure(stack, sizes), max(60.0, left)))
    except TimeoutError:
        log(f"gave up after {time.monotonic() - started:.0f}s (JOBTREE_BENCH_E2E_TIMEOUT)")
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
