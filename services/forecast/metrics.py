"""Prometheus metrics of the forecaster (Reservations: latency, backlog, ETA buckets, states)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FORECAST_LATENCY = Histogram(
    "jobtree_forecast_latency_seconds",
    "Time to answer one RESERVE: snapshot, engine forecast, Reservation written.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

BACKLOG = Gauge(
    "jobtree_reservations_backlog_seconds",
    "Sum over Pending Reservations of the seconds until their earliestStart (0 once due).",
)

ETA = Histogram(
    "jobtree_reservation_eta_seconds",
    "Seconds from creation to earliestStart of the Reservations the forecaster made.",
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 604800, 2592000),
)

RESERVATIONS_TOTAL = Counter(
    "jobtree_reservations",
    "Reservations entering each state (Pending, Active, Released, Blocked, Canceled), as seen "
    "by the forecaster.",
    ["state"],
)

RESERVATIONS = Gauge(
    "jobtree_reservations_current",
    "Reservations currently in each state.",
    ["state"],
)

AT_RISK = Gauge(
    "jobtree_runs_at_risk",
    "Runs carrying the AtRisk condition (in the conflict set of a live Reservation).",
)

ACTIVATIONS = Counter(
    "jobtree_forecast_activations",
    "ACTIVATE requests the forecaster sent, by result (released, not_released, error).",
    ["result"],
)

REFORECASTS = Counter(
    "jobtree_reservations_reforecast",
    "Conservative Reservations that reached earliestStart without room while walltimes or a "
    "window now bound the wait: canceled (reason Reforecast) and reserved again, nothing cut.",
)
