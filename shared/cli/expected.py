"""The expected start next to the guaranteed one, as `kubectl runs plan` and `watch` show it.

``earliestStart`` is the promise (from walltimes); ``status.forecast.expectedStart`` is the same
search over lease ends predicted from the owners' completed Runs, with its p10–p90 spread. Both
are read from the Reservation the forecaster wrote; nothing here computes a forecast.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shared.cli.views import as_list, as_map, as_str, human_duration, iso, parse_ts

Record = dict[str, Any]


def expected_record(forecast: Mapping[str, Any], now: datetime) -> Record | None:
    """``expectedStart``, its spread and basis from ``status.forecast``; None when absent."""
    at = parse_ts(forecast.get("expectedStart"))
    if at is None:
        return None
    p10, p90 = (
        parse_ts(forecast.get("expectedStartP10")),
        parse_ts(forecast.get("expectedStartP90")),
    )
    return {
        "expectedStart": iso(at),
        "p10": iso(p10),
        "p90": iso(p90),
        "basis": as_str(forecast.get("expectedBasis")),
        "inSeconds": max(0, int((at - now).total_seconds())),
        "spreadSeconds": None
        if p10 is None or p90 is None
        else [max(0, int((p10 - now).total_seconds())), max(0, int((p90 - now).total_seconds()))],
    }


def expected_text(expected: Mapping[str, Any] | None, guaranteed: str | None) -> str | None:
    """``expected ~1h40m (p10–p90 1h–2h30m; from 212 completed Runs of org:ai:rai),
    guaranteed by 2026-01-05T09:00:00Z``."""
    if not expected:
        return None
    text = f"expected ~{human_duration(expected.get('inSeconds') or 0)}"
    extra = []
    spread = expected.get("spreadSeconds")
    if isinstance(spread, list) and len(spread) == 2:
        extra.append(f"p10–p90 {human_duration(spread[0])}–{human_duration(spread[1])}")
    if expected.get("basis"):
        extra.append(f"from {expected['basis']}")
    if extra:
        text += f" ({'; '.join(extra)})"
    if guaranteed:
        text += f", guaranteed by {guaranteed}"
    return text


def with_expected(record: Record, reservation: Mapping[str, Any] | None, now: datetime) -> Record:
    """A plan record with its Reservation's expected start and the open-ended claims it waits
    behind added to the ``reservation`` entry."""
    entry = record.get("reservation")
    if reservation is None or not isinstance(entry, dict):
        return record
    forecast = as_map(as_map(reservation.get("status")).get("forecast"))
    entry["expected"] = expected_record(forecast, now)
    entry["openClaims"] = [c for c in as_list(forecast.get("openClaims")) if isinstance(c, str)]
    return record
