"""`kubectl runs plan` shows the expected start beside the guaranteed one (read from status)."""

from __future__ import annotations

from datetime import timedelta

from services.kubectl_runs import render
from shared.cli import views
from shared.cli.expected import expected_text, with_expected

from .test_views import FORECAST, NOW, reservation, run_obj


def stamp(hours: float) -> str:
    return views.iso(NOW + timedelta(hours=hours)) or ""


def test_plan_shows_expected_start_spread_basis_and_the_guarantee() -> None:
    forecast = {
        **FORECAST,
        "expectedStart": stamp(1 + 40 / 60),
        "expectedStartP10": stamp(1),
        "expectedStartP90": stamp(2.5),
        "expectedBasis": "212 completed Runs of org:ai:rai",
        "openClaims": ["first-resv"],
    }
    resv = reservation(state="Pending", countdownSeconds=11500, forecast=forecast)
    run = run_obj(phase="Reserved", pendingReservation="resv-1")
    record = with_expected(views.plan_record(run, resv, NOW), resv, NOW)
    got = record["reservation"]["expected"]
    assert got["inSeconds"] == 6000 and got["spreadSeconds"] == [3600, 9000]
    assert record["reservation"]["openClaims"] == ["first-resv"]
    text = render.plan(record, 120)
    guaranteed = record["reservation"]["earliestStart"]
    assert (
        f"expected ~1h40m (p10–p90 1h–2h30m; from 212 completed Runs of org:ai:rai), "
        f"guaranteed by {guaranteed}"
    ) in text
    assert "Waits on:" in text and "first-resv" in text


def test_without_an_expected_start_nothing_is_claimed() -> None:
    resv = reservation(state="Pending", forecast=FORECAST)
    record = with_expected(views.plan_record(run_obj(phase="Reserved"), resv, NOW), resv, NOW)
    assert record["reservation"]["expected"] is None
    assert expected_text(None, "x") is None
    assert "Expected:" not in render.plan(record)


def test_watch_shows_the_expected_start_and_a_change_of_it() -> None:
    forecast = {**FORECAST, "expectedStart": stamp(1)}
    resv = reservation(state="Pending", countdownSeconds=11500, forecast=forecast)
    (line,) = views.reservation_events(resv, None, NOW)
    assert line["message"].endswith(", expected in 1h"), line
    moved = reservation(
        state="Pending", countdownSeconds=11500, forecast={**forecast, "expectedStart": stamp(0.5)}
    )
    (line,) = views.reservation_events(moved, resv, NOW)
    assert "expected in 30m" in line["message"], line
    assert views.reservation_events(moved, moved, NOW) == []
