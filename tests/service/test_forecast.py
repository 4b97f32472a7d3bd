"""The forecaster over a real nats-server and a real kube-apiserver with KWOK nodes.

The forecaster, the resolver and the REAL binder run in-process. ``RESERVE`` is sent over NATS
as admission sends it; the ETA comes from Leases created with kubectl (``lease_manifest``, with
their expected-end annotations); the timer's ``ACTIVATE`` goes to the real resolver, whose
commit goes through the real binder.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

from services.forecast.config import ForecastOptions, parse_args
from services.forecast.service import Forecaster
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
from shared.kube.translate import parse_time, run_request
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

REGION = "fc-r"
DOMAIN = {"region": REGION, "cluster": "fc-c", "fabric.domain": "fc-f"}
OWNER = "org:fctest"


# --------------------------------------------------------------------------- helpers


def make_run(kube: ControlPlane, namespace: str, name: str, gpus: int, **spec: Any) -> Any:
    """A Run of this module's owner in its region, 3h long unless ``max_duration`` says."""
    max_duration = spec.pop("max_duration", "3h")
    return h.create_run(
        kube, namespace, name, OWNER, gpus, region=REGION, max_duration=max_duration, **spec
    )


def hold(kube: ControlPlane, run_obj: dict[str, Any], node: str, ends_in: timedelta) -> str:
    """An 8-GPU Lease of the Run on ``node`` whose expected end is ``ends_in`` from now."""
    return h.hold_lease(
        kube,
        f"{run_obj['metadata']['name']}-g0-r0",
        node,
        run=RunRef.of(run_obj),
        owner=OWNER,
        envelope="fc-budget/main",
        start=datetime.now(UTC) - timedelta(minutes=5),
        expected_end=datetime.now(UTC) + ends_in,
    )


def reservation(kube: ControlPlane, namespace: str, name: str) -> Any:
    return h.get_json(kube, h.RESERVATIONS, "-n", namespace, name)


def condition(run_obj: dict[str, Any], kind: str = "AtRisk") -> dict[str, Any] | None:
    for cond in (run_obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane, namespace: str) -> list[str]:
    """Two 8-GPU KWOK nodes in their own region and one budget."""
    budget = h.budget_manifest("fc-budget", OWNER, REGION, 64)
    return h.fleet_with_budgets(crds, namespace, "fc", 2, DOMAIN, budget, owners=OWNER)


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
    async with h.kube_api(crds) as api:
        binder, resolver = h.binder_and_resolver(api, nats_server, namespace)
        service = Forecaster(
            ServiceRuntime(
                "forecast",
                nats_url=nats_server.url,
                credentials=nats_server.credentials("forecast"),
            ),
            api,
            ForecastOptions(tick_seconds=0.3, retry_seconds=10, namespace=namespace),
        )
        async with h.started(binder, resolver, service):

            def cached() -> None:
                assert all(service.cache.lease(name) for name in holders.values())

            await h.eventually(cached, interval=0.1, in_thread=False)
            yield service


@pytest_asyncio.fixture(scope="module")
async def client(nats_server: NatsServer, forecaster: Forecaster) -> AsyncIterator[ServiceRuntime]:
    async with h.bus_client(nats_server, "forecast-test-client") as runtime:
        yield runtime


async def reserve(client: ServiceRuntime, run_obj: dict[str, Any]) -> ReserveReply:
    req = ReserveRequest(
        run=RunRef.of(run_obj),
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
    latency_before = h.sample("jobtree_forecast_latency_seconds_count")
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
    assert obj["metadata"]["annotations"][f"{h.GROUP}/gpus"] == "16"
    assert resv.status.state is not None and resv.status.state.value == "Pending"
    assert resv.status.reason == "NoCapacity"
    assert 7000 <= (resv.status.countdown_seconds or 0) <= 7200
    fc = resv.status.forecast
    assert fc is not None and fc.deficit_gpus == 16
    assert sorted(fc.conflict_set or []) == [f"{namespace}/holder-a", f"{namespace}/holder-b"]
    assert fc.kill_probability == {f"{namespace}/holder-a": 1.0, f"{namespace}/holder-b": 1.0}
    assert [r.action.value for r in fc.remedies or []] == ["Lottery"]
    assert h.sample("jobtree_forecast_latency_seconds_count") == latency_before + 1
    assert h.sample("jobtree_reservation_eta_seconds_count") >= 1

    def at_risk() -> None:
        for holder in ("holder-a", "holder-b"):
            cond = condition(h.get_json(crds, h.RUNS, "-n", namespace, holder))
            assert cond is not None and cond["status"] == "True", cond
            assert "kill probability 1.00" in cond["message"] and name in cond["message"]

    await h.eventually(at_risk)
    # The countdown stays fresh and a re-sent RESERVE finds the same Reservation.
    await h.eventually(
        lambda: _below(reservation(crds, namespace, name), resv.status.countdown_seconds or 0)
    )
    again = await reserve(client, wants)
    assert again.reservation == name and again.earliest_start == reply.earliest_start
    assert h.sample("jobtree_reservations_backlog_seconds") > 7000


async def test_reserve_for_a_location_without_nodes_is_refused_with_a_typed_reason(
    crds: ControlPlane, namespace: str, client: ServiceRuntime
) -> None:
    """No node matches the Run's selector: nothing can be reserved, and the answer says so in
    words admission shows on the Run (not an internal error)."""
    lost = make_run(crds, namespace, "lost", 8, locality={"selector": {"region": "nowhere"}})
    errors_before = h.sample(
        "jobtree_handler_errors_total", service="forecast", subject=RESERVE.name
    )
    with pytest.raises(BusError) as refused:
        await reserve(client, lost)
    assert refused.value.code == "422", refused.value
    assert refused.value.message == (
        "NoNodesInScope: no node of gpuType H100-80GB matches selector {region=nowhere}; "
        "nothing to reserve until such nodes join"
    )
    assert (
        h.sample("jobtree_handler_errors_total", service="forecast", subject=RESERVE.name)
        == errors_before
    )
    made = h.get_json(crds, h.RESERVATIONS, "-n", namespace)["items"]
    assert [o for o in made if o["spec"]["runRef"]["name"] == "lost"] == []


async def test_requests_of_a_burst_share_one_snapshot(forecaster: Forecaster) -> None:
    """Rebuilding the engine view replays the whole ledger: RESERVEs of a burst on an unchanged
    cache share one snapshot, a later instant gets a fresh one."""
    first = forecaster.snapshot(datetime.now(UTC))
    # Measured from the snapshot's own instant: the timer may have taken it a moment ago.
    assert forecaster.snapshot(first.now + timedelta(milliseconds=500)) is first
    assert forecaster.snapshot(first.now + timedelta(seconds=2)) is not first


def _below(obj: dict[str, Any], seconds: int) -> None:
    assert obj["status"]["countdownSeconds"] < seconds


async def test_a_spec_change_cancels_the_reservation_and_clears_the_risk(
    crds: ControlPlane, namespace: str, client: ServiceRuntime
) -> None:
    wants = h.get_json(crds, h.RUNS, "-n", namespace, "wants")
    name = reservation_name("wants", wants["metadata"]["uid"])
    crds.kubectl(
        "patch", h.RUNS, "wants", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"runtime": {"maxDuration": "90m"}}}),
    )  # fmt: skip

    def canceled() -> dict[str, Any]:
        status: dict[str, Any] = reservation(crds, namespace, name).get("status") or {}
        assert status.get("state") == "Canceled", status
        return status

    status = await h.eventually(canceled)
    assert status["reason"] == "RunChanged" and status["canceledAt"]

    def cleared() -> None:
        for holder in ("holder-a", "holder-b"):
            cond = condition(h.get_json(crds, h.RUNS, "-n", namespace, holder))
            assert cond is not None and cond["status"] == "False", cond

    await h.eventually(cleared)


async def test_a_conservative_promise_reached_without_room_is_reforecast_not_cut(
    crds: ControlPlane, namespace: str, forecaster: Forecaster, holders: dict[str, str]
) -> None:
    """Both nodes are busy until walltimes 1h and 2h away: at the earliestStart of a
    conservative Reservation nothing fits, but walltimes now bound the wait, so the forecaster
    cancels it ``Reforecast`` (admission reserves the Run again) and no lease is cut."""
    run = make_run(crds, namespace, "patient", 8)
    before = h.sample("jobtree_reservations_reforecast_total")
    due = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    manifest = h.reservation_manifest(
        namespace,
        "patient-resv",
        run="patient",
        labels=DOMAIN,
        nodes=["fc-01"],
        earliest_start=due.isoformat().replace("+00:00", "Z"),
        gpus=8,
    )
    manifest["metadata"]["labels"] = {
        "app.kubernetes.io/managed-by": "jobtree-forecast",
        f"{h.GROUP}/run-uid": label_value(run["metadata"]["uid"]),
    }
    manifest["metadata"]["annotations"][f"{h.GROUP}/run-generation"] = str(
        run["metadata"]["generation"]
    )
    h.apply(crds, manifest)
    crds.kubectl(
        "patch",
        h.RESERVATIONS,
        "patient-resv",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "state": "Pending",
                    "reason": "NoCapacity",
                    "message": "nothing bounds the wait",
                    "countdownSeconds": 2,
                    "forecast": {"deficitGPUs": 8, "confidence": "conservative"},
                }
            }
        ),
    )

    def reforecast() -> dict[str, Any]:
        status: dict[str, Any] = reservation(crds, namespace, "patient-resv").get("status") or {}
        assert status.get("state") == "Canceled", status
        return status

    status = await h.eventually(reforecast, timeout=30)
    assert status["reason"] == "Reforecast", status
    assert "walltime now bounds the wait" in status["message"], status
    assert "activatedAt" not in status and not status.get("audit"), status
    for lease in holders.values():
        assert not h.get_json(crds, h.LEASES, lease).get("status", {}).get("closed"), lease
    assert h.sample("jobtree_reservations_reforecast_total") >= before + 1


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
    h.apply(
        crds,
        h.reservation_manifest(
            namespace,
            "soon-admin",
            run="soon",
            labels=DOMAIN,
            nodes=["fc-01"],
            earliest_start=due.isoformat().replace("+00:00", "Z"),
        ),
    )

    def initialised() -> dict[str, Any]:
        obj: dict[str, Any] = reservation(crds, namespace, "soon-admin")
        status = obj.get("status") or {}
        assert status.get("state") == "Pending" and "forecast" in status, status
        assert obj["metadata"]["labels"][f"{h.GROUP}/run-uid"]
        return status

    first = await h.eventually(initialised)
    assert first["forecast"]["deficitGPUs"] == 8
    assert first["forecast"]["conflictSet"] == [f"{namespace}/holder-a"]

    def released() -> dict[str, Any]:
        status: dict[str, Any] = reservation(crds, namespace, "soon-admin").get("status") or {}
        assert status.get("state") == "Released", status
        return status

    status = await h.eventually(released, timeout=30)
    await sub.unsubscribe()
    assert len(seen) == 1 and seen[0].name == "soon-admin"
    activated = parse_time(status["activatedAt"])
    assert activated >= due  # the request carries no time: the resolver used this one
    seed = status["audit"]["seed"]
    assert seed and status["audit"]["conflictSet"] == [f"{namespace}/holder-a"]
    closed = h.get_json(crds, h.LEASES, holders["a"])["status"]
    assert closed["closureReason"] == f"RandomPreempt({seed})"
    selector = f"{h.GROUP}/run={label_value('soon')}"
    leases = h.get_json(crds, h.LEASES, "-l", selector)["items"]
    assert [x["spec"]["slice"]["nodes"] for x in leases] == [["fc-01"]]
    assert h.sample("jobtree_forecast_activations_total", result="released") >= 1
    assert h.sample("jobtree_reservations_total", state="Released") >= 1
