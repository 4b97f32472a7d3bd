"""The forecaster over a real nats-server and a real kube-apiserver with KWOK nodes.

The forecaster, the resolver and the REAL binder run in-process. ``RESERVE`` is sent over NATS
as admission sends it; the ETA comes from Leases created with kubectl (``lease_manifest``, with
their expected-end annotations); the timer's ``ACTIVATE`` goes to the real resolver, whose
commit goes through the real binder.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from services.binder.service import Binder, BinderOptions
from services.forecast.config import ForecastOptions, parse_args
from services.forecast.service import Forecaster
from services.resolver.service import Resolver, ResolverOptions
from shared.api import Reservation, parse_object
from shared.api.lease import label_value
from shared.bus import (
    ACTIVATE,
    RESERVE,
    ActivateRequest,
    BusError,
    ReserveReply,
    ReserveRequest,
    RunRef,
    ServiceRuntime,
    decode,
)
from shared.control.reservations import reservation_name
from shared.engine.bindplan import LeaseIntent
from shared.engine.model import FundingKind, LeaseReason, Role
from shared.kube.client import make_client
from shared.kube.translate import lease_manifest, parse_time, run_request
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from .conftest import add_nodes

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

GROUP = "rq.davidlangworthy.io"
LEASES = f"leases.{GROUP}"
RESERVATIONS = f"reservations.{GROUP}"
RUNS = f"runs.{GROUP}"
FLAVOR = "H100-80GB"
REGION = "fc-r"
DOMAIN = {"region": REGION, "cluster": "fc-c", "fabric.domain": "fc-f"}
OWNER = "org:fctest"


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


def apply(kube: ControlPlane, obj: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(obj))


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def make_run(kube: ControlPlane, namespace: str, name: str, gpus: int, **spec: Any) -> Any:
    body = {
        "owner": OWNER,
        "resources": {"gpuType": FLAVOR, "totalGPUs": gpus},
        "locality": {"selector": {"region": REGION}, **spec.pop("locality", {})},
        "runtime": {"maxDuration": spec.pop("max_duration", "3h")},
        **spec,
    }
    apply(
        kube,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Run",
            "metadata": {"name": name, "namespace": namespace},
            "spec": body,
        },
    )
    return get_json(kube, RUNS, "-n", namespace, name)


def hold(kube: ControlPlane, run_obj: dict[str, Any], node: str, ends_in: timedelta) -> str:
    """An 8-GPU Lease of the Run on ``node`` whose expected end is ``ends_in`` from now."""
    meta = run_obj["metadata"]
    start = datetime.now(UTC) - timedelta(minutes=5)
    intent = LeaseIntent(
        name=f"{meta['name']}-g0-r0",
        run=(meta["namespace"], meta["name"]),
        owner=OWNER,
        node=node,
        gpus=8,
        role=Role.ACTIVE,
        group=0,
        rank=0,
        envelope="fc-budget/main",
        payer_owner=OWNER,
        funding=FundingKind.OWNED,
        start=start,
        reason=LeaseReason.START,
        expected_end=datetime.now(UTC) + ends_in,
        comp_path=("GROUP[0]", "RANK[0]"),
    )
    apply(kube, lease_manifest(intent, run_uid=meta["uid"], gen=meta.get("generation", 1)))
    return intent.name


def ref_of(run_obj: dict[str, Any]) -> RunRef:
    meta = run_obj["metadata"]
    return RunRef(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        generation=meta.get("generation", 1),
    )


def reservation(kube: ControlPlane, namespace: str, name: str) -> Any:
    return get_json(kube, RESERVATIONS, "-n", namespace, name)


def condition(run_obj: dict[str, Any], kind: str = "AtRisk") -> dict[str, Any] | None:
    for cond in (run_obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane, namespace: str) -> list[str]:
    """Two 8-GPU KWOK nodes in their own region and one budget."""
    names = add_nodes(crds, "fc", 2, **DOMAIN, **{"gpu.flavor": FLAVOR})
    apply(
        crds,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Budget",
            "metadata": {"name": "fc-budget"},
            "spec": {
                "owner": OWNER,
                "envelopes": [
                    {
                        "name": "main",
                        "flavor": FLAVOR,
                        "selector": {"region": REGION},
                        "concurrency": 64,
                    }
                ],
            },
        },
    )
    # No admission service may act on this module's Runs: the namespace speaks for nobody.
    crds.kubectl("annotate", "--overwrite", "namespace", namespace, f"{GROUP}/owners=nobody")
    return names


@pytest.fixture(scope="module")
def holders(crds: ControlPlane, namespace: str, fleet: list[str]) -> dict[str, str]:
    """Both nodes busy: holder-a's lease ends in 1h, holder-b's in 2h."""
    a = make_run(crds, namespace, "holder-a", 8)
    b = make_run(crds, namespace, "holder-b", 8)
    return {
        "a": hold(crds, a, "fc-01", timedelta(hours=1)),
        "b": hold(crds, b, "fc-02", timedelta(hours=2)),
    }


@pytest_asyncio.fixture(scope="module")
async def forecaster(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, holders: dict[str, str]
) -> AsyncIterator[Forecaster]:
    """The forecaster with a fast timer, the resolver and the real binder, in-process."""
    api = await make_client(str(crds.kubeconfig))
    # The holders' Leases are written directly, without pods: the binder must not end them
    # as gangs whose pods are gone.
    options = BinderOptions(missing_pod_grace=timedelta(days=365))
    binder = Binder(ServiceRuntime("binder", nats_url=nats_server.url), api, options)
    resolver = Resolver(
        ServiceRuntime("resolver", nats_url=nats_server.url),
        api,
        ResolverOptions(namespace=namespace),
    )
    service = Forecaster(
        ServiceRuntime("forecast", nats_url=nats_server.url),
        api,
        ForecastOptions(tick_seconds=0.3, retry_seconds=10, namespace=namespace),
    )
    await asyncio.wait_for(binder.start(), 60)
    await asyncio.wait_for(resolver.start(), 60)
    await asyncio.wait_for(service.start(), 60)
    deadline = time.monotonic() + 20
    while not all(service.cache.lease(name) for name in holders.values()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    try:
        yield service
    finally:
        await service.stop()
        await resolver.stop()
        await binder.stop()
        await api.close()


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, forecaster: Forecaster) -> AsyncIterator[ServiceRuntime]:
    runtime = ServiceRuntime("forecast-test-client", nats_url=nats_server.url)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def reserve(client: ServiceRuntime, run_obj: dict[str, Any]) -> ReserveReply:
    req = ReserveRequest(
        run=ref_of(run_obj),
        request=run_request(run_obj),
        stage="pack",
        reason="NoCapacity",
        message="no node has room now",
        shortfall=16,
    )
    return await client.request(RESERVE, req, timeout=30)


# --------------------------------------------------------------------------- tests


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBTREE_FORECAST_TICK_SECONDS", "7")
    cfg, options = parse_args(["--retry-seconds", "9", "--conservative-lead-hours", "2"])
    assert (cfg.name, options.tick_seconds, options.retry_seconds) == ("forecast", 7.0, 9.0)
    assert options.settings.conservative_lead == timedelta(hours=2)


async def test_reserve_creates_a_reservation_with_a_walltime_eta_and_marks_risk(
    crds: ControlPlane, namespace: str, client: ServiceRuntime, holders: dict[str, str]
) -> None:
    wants = make_run(crds, namespace, "wants", 16, locality={"groupGPUs": 8})
    latency_before = sample("jobtree_forecast_latency_seconds_count")
    sent = datetime.now(UTC)
    reply = await reserve(client, wants)
    name = reservation_name("wants", wants["metadata"]["uid"])
    assert reply.reservation == name and reply.confidence == "walltime"
    # Both nodes are needed: the ETA is the later expected end (holder-b, in 2h).
    eta = timedelta(hours=2)
    assert abs((reply.earliest_start - sent) - eta) < timedelta(seconds=30)
    obj = reservation(crds, namespace, name)
    resv = parse_object(obj)
    assert isinstance(resv, Reservation) and resv.status is not None
    assert resv.spec.earliest_start == reply.earliest_start
    assert sorted(resv.spec.intended_slice.nodes or []) == ["fc-01", "fc-02"]
    assert resv.spec.intended_slice.domain == DOMAIN
    assert resv.spec.paying_envelope == "fc-budget/main"
    assert obj["metadata"]["annotations"][f"{GROUP}/gpus"] == "16"
    assert resv.status.state is not None and resv.status.state.value == "Pending"
    assert resv.status.reason == "NoCapacity"
    assert 7000 <= (resv.status.countdown_seconds or 0) <= 7200
    fc = resv.status.forecast
    assert fc is not None and fc.deficit_gpus == 16
    assert sorted(fc.conflict_set or []) == [f"{namespace}/holder-a", f"{namespace}/holder-b"]
    assert fc.kill_probability == {f"{namespace}/holder-a": 1.0, f"{namespace}/holder-b": 1.0}
    assert [r.action.value for r in fc.remedies or []] == ["Lottery"]
    assert sample("jobtree_forecast_latency_seconds_count") == latency_before + 1
    assert sample("jobtree_reservation_eta_seconds_count") >= 1

    def at_risk() -> None:
        for holder in ("holder-a", "holder-b"):
            cond = condition(get_json(crds, RUNS, "-n", namespace, holder))
            assert cond is not None and cond["status"] == "True", cond
            assert "kill probability 1.00" in cond["message"] and name in cond["message"]

    await eventually(at_risk)
    # The countdown stays fresh and a re-sent RESERVE finds the same Reservation.
    await eventually(
        lambda: _below(reservation(crds, namespace, name), resv.status.countdown_seconds or 0)
    )
    again = await reserve(client, wants)
    assert again.reservation == name and again.earliest_start == reply.earliest_start
    assert sample("jobtree_reservations_backlog_seconds") > 7000


async def test_reserve_for_a_location_without_nodes_is_refused_with_a_typed_reason(
    crds: ControlPlane, namespace: str, client: ServiceRuntime
) -> None:
    """No node matches the Run's selector: nothing can be reserved, and the answer says so in
    words admission shows on the Run (not an internal error)."""
    lost = make_run(crds, namespace, "lost", 8, locality={"selector": {"region": "nowhere"}})
    errors_before = sample("jobtree_handler_errors_total", service="forecast", subject=RESERVE.name)
    with pytest.raises(BusError) as refused:
        await reserve(client, lost)
    assert refused.value.code == "422", refused.value
    assert refused.value.message == (
        "NoNodesInScope: no node of gpuType H100-80GB matches selector {region=nowhere}; "
        "nothing to reserve until such nodes join"
    )
    assert (
        sample("jobtree_handler_errors_total", service="forecast", subject=RESERVE.name)
        == errors_before
    )
    made = get_json(crds, RESERVATIONS, "-n", namespace)["items"]
    assert [o for o in made if o["spec"]["runRef"]["name"] == "lost"] == []


async def test_requests_of_a_burst_share_one_snapshot(forecaster: Forecaster) -> None:
    """Rebuilding the engine view replays the whole ledger: RESERVEs of a burst on an unchanged
    cache share one snapshot, a later instant gets a fresh one."""
    now = datetime.now(UTC)
    first = forecaster.snapshot(now)
    assert forecaster.snapshot(now + timedelta(milliseconds=500)) is first
    assert forecaster.snapshot(now + timedelta(seconds=2)) is not first


def _below(obj: dict[str, Any], seconds: int) -> None:
    assert obj["status"]["countdownSeconds"] < seconds


async def test_a_spec_change_cancels_the_reservation_and_clears_the_risk(
    crds: ControlPlane, namespace: str, client: ServiceRuntime
) -> None:
    wants = get_json(crds, RUNS, "-n", namespace, "wants")
    name = reservation_name("wants", wants["metadata"]["uid"])
    crds.kubectl(
        "patch", RUNS, "wants", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"runtime": {"maxDuration": "90m"}}}),
    )  # fmt: skip

    def canceled() -> dict[str, Any]:
        status: dict[str, Any] = reservation(crds, namespace, name).get("status") or {}
        assert status.get("state") == "Canceled", status
        return status

    status = await eventually(canceled)
    assert status["reason"] == "RunChanged" and status["canceledAt"]

    def cleared() -> None:
        for holder in ("holder-a", "holder-b"):
            cond = condition(get_json(crds, RUNS, "-n", namespace, holder))
            assert cond is not None and cond["status"] == "False", cond

    await eventually(cleared)


async def test_the_timer_activates_an_administrator_reservation_through_the_resolver(
    crds: ControlPlane,
    namespace: str,
    client: ServiceRuntime,
    holders: dict[str, str],
) -> None:
    make_run(crds, namespace, "soon", 8)
    seen: list[ActivateRequest] = []

    async def on_msg(msg: Any) -> None:
        seen.append(decode(msg.data, ActivateRequest))

    sub = await client.nc.subscribe(ACTIVATE.name, cb=on_msg)  # observes, the resolver answers
    due = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    apply(
        crds,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Reservation",
            "metadata": {"name": "soon-admin", "namespace": namespace},
            "spec": {
                "runRef": {"name": "soon"},
                "intendedSlice": {"domain": DOMAIN, "nodes": ["fc-01"]},
                "earliestStart": due.isoformat().replace("+00:00", "Z"),
            },
        },
    )

    def initialised() -> dict[str, Any]:
        obj: dict[str, Any] = reservation(crds, namespace, "soon-admin")
        status = obj.get("status") or {}
        assert status.get("state") == "Pending" and "forecast" in status, status
        assert obj["metadata"]["labels"][f"{GROUP}/run-uid"]
        return status

    first = await eventually(initialised)
    assert first["forecast"]["deficitGPUs"] == 8
    assert first["forecast"]["conflictSet"] == [f"{namespace}/holder-a"]

    def released() -> dict[str, Any]:
        status: dict[str, Any] = reservation(crds, namespace, "soon-admin").get("status") or {}
        assert status.get("state") == "Released", status
        return status

    status = await eventually(released, timeout=30)
    await sub.unsubscribe()
    assert len(seen) == 1 and seen[0].name == "soon-admin"
    activated = parse_time(status["activatedAt"])
    assert activated >= due and seen[0].at == activated
    seed = status["audit"]["seed"]
    assert seed and status["audit"]["conflictSet"] == [f"{namespace}/holder-a"]
    closed = get_json(crds, LEASES, holders["a"])["status"]
    assert closed["closureReason"] == f"RandomPreempt({seed})"
    selector = f"{GROUP}/run={label_value('soon')}"
    leases = get_json(crds, LEASES, "-l", selector)["items"]
    assert [x["spec"]["slice"]["nodes"] for x in leases] == [["fc-01"]]
    assert sample("jobtree_forecast_activations_total", result="released") >= 1
    assert sample("jobtree_reservations_total", state="Released") >= 1
