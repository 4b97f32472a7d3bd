"""Plain helpers shared by the service tests: kubectl readers and writers, manifests, commits,
in-process services and service processes.

Fixtures live in ``conftest.py``; everything here is an ordinary function or context manager that
the test modules call with their own constants (owner, envelope, region).
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
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kubernetes_asyncio.client import ApiClient
from prometheus_client import REGISTRY

from services.binder.service import Binder, BinderOptions
from services.resolver.service import Resolver, ResolverOptions
from shared.api.lease import label_value
from shared.bus import CommitRequest, LeaseEnd, PlanRequest, RunRef, ServiceRuntime
from shared.engine.bindplan import BindIntent, LeaseIntent, bind_plan
from shared.engine.model import Envelope, FundingKind, LeaseReason, Role, RunRequest
from shared.engine.offers import Funding, Offer
from shared.engine.pack import GroupPlacement, PlacedSlice, Placement
from shared.engine.state import Settings
from shared.kube.client import make_client
from shared.kube.translate import lease_manifest, run_request
from shared.localenv.controlplane import ControlPlane
from shared.localenv.fleet import fleet_manifest
from shared.localenv.natsserver import NatsServer
from shared.localenv.processes import free_port
from tests.conftest import TESTER

REPO = Path(__file__).resolve().parents[2]
GROUP = "rq.davidlangworthy.io"
LEASES = f"leases.{GROUP}"
RESERVATIONS = f"reservations.{GROUP}"
RUNS = f"runs.{GROUP}"
FLAVOR = "H100-80GB"


# --------------------------------------------------------------------------- waiting


async def eventually(
    check: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.2,
    *,
    in_thread: bool = True,
) -> Any:
    """Retry ``check`` until it stops raising AssertionError: every module polls the real servers.

    ``in_thread`` runs a blocking check (kubectl, HTTP) off the event loop; checks that only read
    state owned by the loop (a service's cache, a subscription's list) pass ``in_thread=False``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.to_thread(check) if in_thread else check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


def sample(metric: str, **labels: str) -> float:
    """A metric's value in this process's registry (0 when never set): services run in-process."""
    return REGISTRY.get_sample_value(metric, labels) or 0.0


# --------------------------------------------------------------------------- kubectl


def get_json(kube: ControlPlane, *args: str) -> Any:
    """``kubectl get … -o json`` parsed: every effect is read back from the API server."""
    return json.loads(kube.kubectl("get", *args, "-o", "json").stdout)


def apply(kube: ControlPlane, obj: dict[str, Any]) -> None:
    """``kubectl apply`` one object: tests write objects exactly as a user or service would."""
    kube.kubectl("apply", "-f", "-", input=json.dumps(obj))


def add_nodes(kube: ControlPlane, prefix: str, count: int, **labels: str) -> list[str]:
    """KWOK-managed fake GPU nodes; returns their names once Ready."""
    manifest = fleet_manifest(prefix, count, labels)
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    names = [item["metadata"]["name"] for item in manifest["items"]]
    kube.kubectl(
        "wait", "--for=condition=Ready", "--timeout=60s", *(f"node/{n}" for n in names), timeout=90
    )
    return names


def fleet_with_budgets(
    kube: ControlPlane,
    namespace: str,
    prefix: str,
    count: int,
    labels: dict[str, str],
    *budgets: dict[str, Any],
    owners: str = "nobody",
) -> list[str]:
    """KWOK nodes of the test flavor and the module's Budgets, in a namespace for ``owners``.

    By default the namespace speaks for nobody, so no admission service acts on the module's
    Runs. Modules that send commits by hand name their owners: the binder starts nothing for a
    Run whose namespace may not name its owner.
    """
    names = add_nodes(kube, prefix, count, **labels, **{"gpu.flavor": FLAVOR})
    for budget in budgets:
        apply(kube, budget)
    kube.kubectl("annotate", "--overwrite", "namespace", namespace, f"{GROUP}/owners={owners}")
    return names


def lease_items(kube: ControlPlane, namespace: str, run: str) -> list[dict[str, Any]]:
    """Every Lease of the Run (open or closed), by the binder's run and namespace labels."""
    selector = f"{GROUP}/run={label_value(run)},{GROUP}/namespace={label_value(namespace)}"
    items: list[dict[str, Any]] = get_json(kube, LEASES, "-l", selector)["items"]
    return items


def pod_items(kube: ControlPlane, namespace: str, run: str) -> list[dict[str, Any]]:
    """Every pod of the Run, by the binder's run label."""
    items: list[dict[str, Any]] = get_json(
        kube, "pods", "-n", namespace, "-l", f"{GROUP}/run={label_value(run)}"
    )["items"]
    return items


# --------------------------------------------------------------------------- manifests


def create_run(
    kube: ControlPlane,
    namespace: str,
    name: str,
    owner: str,
    gpus: int,
    *,
    region: str | None = None,
    max_duration: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """Apply a Run and read it back, so tests see the uid and generation the API server gave it.

    ``region`` adds a locality selector (merged with ``spec["locality"]``), ``max_duration`` a
    runtime limit (merged with ``spec["runtime"]``); other ``spec`` keys go in as given.
    """
    body: dict[str, Any] = {"owner": owner, "resources": {"gpuType": FLAVOR, "totalGPUs": gpus}}
    if region is not None:
        body["locality"] = {"selector": {"region": region}, **spec.pop("locality", {})}
    if max_duration is not None:
        body["runtime"] = {"maxDuration": max_duration, **spec.pop("runtime", {})}
    body.update(spec)
    apply(
        kube,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Run",
            "metadata": {"name": name, "namespace": namespace},
            "spec": body,
        },
    )
    obj: dict[str, Any] = get_json(kube, RUNS, "-n", namespace, name)
    return obj


def budget_manifest(name: str, owner: str, region: str, concurrency: int) -> dict[str, Any]:
    """A Budget with one ``main`` envelope of the test flavor over ``region``."""
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Budget",
        "metadata": {"name": name},
        "spec": {
            "owner": owner,
            "envelopes": [
                {
                    "name": "main",
                    "flavor": FLAVOR,
                    "selector": {"region": region},
                    "concurrency": concurrency,
                }
            ],
        },
    }


def reservation_manifest(
    namespace: str,
    name: str,
    *,
    run: str,
    labels: dict[str, str],
    nodes: list[str],
    earliest_start: str = "2099-01-01T00:00:00Z",
    gpus: int | None = None,
    paying_envelope: str | None = None,
) -> dict[str, Any]:
    """A Reservation as an administrator (or the forecaster, with ``gpus``) writes it.

    The intended slice's domain is the region, cluster and fabric domain of the nodes'
    ``labels``; the default earliest start is far away, so the GPUs stay promised.
    """
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if gpus is not None:
        metadata["annotations"] = {f"{GROUP}/gpus": str(gpus)}
    domain = {key: labels[key] for key in ("region", "cluster", "fabric.domain")}
    spec: dict[str, Any] = {
        "runRef": {"name": run},
        "intendedSlice": {"domain": domain, "nodes": nodes},
        "earliestStart": earliest_start,
    }
    if paying_envelope is not None:
        spec["payingEnvelope"] = paying_envelope
    return {"apiVersion": f"{GROUP}/v1", "kind": "Reservation", "metadata": metadata, "spec": spec}


def hold_lease(
    kube: ControlPlane,
    name: str,
    node: str,
    *,
    run: RunRef,
    owner: str,
    envelope: str,
    gpus: int = 8,
    role: Role = Role.ACTIVE,
    group: int = 0,
    rank: int = 0,
    start: datetime | None = None,
    expected_end: datetime | None = None,
    comp_path: tuple[str, ...] | None = None,
) -> str:
    """Write an open Lease with kubectl as the binder would (no pods); returns its name.

    A spare has rank -1 and, unless ``comp_path`` says otherwise, the position ``SPARE[0]``.
    """
    spare = role is Role.SPARE
    intent = LeaseIntent(
        name=name,
        run=(run.namespace, run.name),
        owner=owner,
        node=node,
        gpus=gpus,
        role=role,
        group=group,
        rank=-1 if spare else rank,
        envelope=envelope,
        payer_owner=owner,
        funding=FundingKind.OWNED,
        start=start or datetime.now(UTC),
        reason=LeaseReason.START,
        expected_end=expected_end,
        comp_path=comp_path or (f"GROUP[{group}]", "SPARE[0]" if spare else f"RANK[{rank}]"),
    )
    apply(kube, lease_manifest(intent, run_uid=run.uid, gen=run.generation))
    return name


# --------------------------------------------------------------------------- bus requests


def bind_intent(
    run_obj: dict[str, Any],
    slices: Iterable[tuple[str, int]],
    *,
    envelope: str,
    owner: str,
    domain: tuple[str, str, str],
    reason: LeaseReason = LeaseReason.START,
    attempt: int = 0,
    first_rank: int = 0,
) -> BindIntent:
    """A bind of one active rank per (node, gpus) in group 0, all paid by ``envelope``."""
    placed = tuple(
        PlacedSlice(
            node=node,
            gpus=gpus,
            role=Role.ACTIVE,
            group=0,
            rank=first_rank + rank,
            envelope=envelope,
            payer_owner=owner,
            funding=FundingKind.OWNED,
        )
        for rank, (node, gpus) in enumerate(slices)
    )
    placement = Placement(groups=(GroupPlacement(index=0, domain=domain, slices=placed),))
    return bind_plan(
        run_request(run_obj), placement, now=datetime.now(UTC), reason=reason, attempt=attempt
    )


def commit_request(
    run_obj: dict[str, Any],
    intent: BindIntent,
    reason: str = "",
    ends: Iterable[tuple[str, str]] = (),
) -> CommitRequest:
    """The COMMIT admission or the resolver would send for ``intent`` (ending ``ends``)."""
    return CommitRequest(
        key=intent.key,
        run=RunRef.of(run_obj),
        version=0,
        leases=list(intent.leases),
        pods=list(intent.pods),
        ends=[LeaseEnd(name=name, closure=closure) for name, closure in ends],
        reason=reason,
    )


def engine_run(
    namespace: str,
    name: str,
    gpus: int,
    *,
    owner: str,
    region: str,
    group: int | None = 8,
    opportunistic: bool = False,
) -> RunRequest:
    """The engine's view of a Run that exists only on the bus (the packer never reads Runs)."""
    return RunRequest(
        key=(namespace, name),
        uid=f"uid-{name}",
        owner=owner,
        flavor=FLAVOR,
        total_gpus=gpus,
        group_gpus=group,
        selector={"region": region},
        opportunistic=opportunistic,
    )


def plan_request(run: RunRequest, envelope: Envelope, own_claim: str | None = None) -> PlanRequest:
    """A PLAN as admission sends it, all of the Run owned by ``envelope`` over its selector."""
    funded = replace(envelope, selector=dict(run.selector))
    return PlanRequest(
        run=RunRef(namespace=run.key[0], name=run.key[1], uid=run.uid, generation=1),
        request=run,
        funding=Funding(offers=(Offer(funded, run.total_gpus, FundingKind.OWNED),)),
        own_claim=own_claim,
    )


# --------------------------------------------------------------------------- in-process services


class Service(Protocol):
    """Anything with the services' async start/stop (the services and ServiceRuntime)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Service)
T = TypeVar("T")


@asynccontextmanager
async def kube_api(kube: ControlPlane) -> AsyncIterator[ApiClient]:
    """An API client for in-process services, closed after they stop."""
    api = await make_client(str(kube.kubeconfig))
    try:
        yield api
    finally:
        await api.close()


@asynccontextmanager
async def started(*services: Service, timeout: float | None = 60) -> AsyncIterator[None]:
    """Start ``services`` in order, stop the started ones in reverse: one teardown for all."""
    running: list[Service] = []
    try:
        for service in services:
            await asyncio.wait_for(service.start(), timeout)
            running.append(service)
        yield
    finally:
        for service in reversed(running):
            await service.stop()


@asynccontextmanager
async def in_process(kube: ControlPlane, make: Callable[[ApiClient], S]) -> AsyncIterator[S]:
    """One service built on a fresh API client, started, then stopped before the client closes."""
    async with kube_api(kube) as api:
        service = make(api)
        async with started(service):
            yield service


@asynccontextmanager
async def collected(
    client: ServiceRuntime, subject: str, record: Callable[[Any], T]
) -> AsyncIterator[list[T]]:
    """``record(msg)`` of every message on ``subject`` while inside (a core subscription)."""
    seen: list[T] = []

    async def on_msg(msg: Any) -> None:
        seen.append(record(msg))

    sub = await client.nc.subscribe(subject, cb=on_msg)
    try:
        yield seen
    finally:
        await sub.unsubscribe()


@asynccontextmanager
async def bus_client(nats: NatsServer, name: str) -> AsyncIterator[ServiceRuntime]:
    """A started runtime that sends and observes bus traffic as a peer service would."""
    runtime = ServiceRuntime(name, nats_url=nats.url, credentials=nats.credentials(TESTER))
    async with started(runtime, timeout=None):
        yield runtime


def binder_and_resolver(
    api: ApiClient, nats: NatsServer, namespace: str
) -> tuple[Binder, Resolver]:
    """The real binder and a resolver for ``namespace``, not yet started.

    The tests write holders' Leases directly, without pods: the binder must not end them as
    gangs whose pods are gone.
    """
    options = BinderOptions(settings=Settings(missing_pod_grace=timedelta(days=365)))
    binder = Binder(
        ServiceRuntime("binder", nats_url=nats.url, credentials=nats.credentials("binder")),
        api,
        options,
    )
    resolver = Resolver(
        ServiceRuntime("resolver", nats_url=nats.url, credentials=nats.credentials("resolver")),
        api,
        ResolverOptions(namespace=namespace),
    )
    return binder, resolver


# --------------------------------------------------------------------------- service processes


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET (an HTTP error is an answer too); (0, "") when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()
    except OSError:
        return 0, ""


def spawn_service(
    service: str,
    kube: ControlPlane,
    nats: NatsServer,
    log: Path,
    *extra: str,
    log_format: str = "text",
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m services.<service>`` on a free HTTP port, output to ``log``; (process, port).

    ``env`` is added to this process's environment (the way a Deployment sets settings)."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"services.{service}",
                f"--nats-url={nats.url}",
                f"--kubeconfig={kube.kubeconfig}",
                f"--http-port={port}",
                f"--log-format={log_format}",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), **nats.service_env(service), **(env or {})),
        )
    return proc, port


async def wait_ready(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30
) -> None:
    """Until the process answers /readyz with 200; its log is the message if it dies first."""

    def ready() -> None:
        assert proc.poll() is None, log.read_text()
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200

    await eventually(ready, timeout=timeout, interval=0.2)


async def terminate(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM the process and return its exit code: a clean stop exits 0."""
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, timeout)


def kill(*procs: subprocess.Popen[bytes] | None) -> None:
    """Kill whatever is still running (a test's ``finally``)."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
