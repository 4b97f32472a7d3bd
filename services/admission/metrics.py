"""Prometheus metrics the admission service exports (registered once per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNS_SUBMITTED = Counter(
    "jobtree_runs_submitted_total",
    "Runs seen for the first time without a status (new submissions), by GPU flavor.",
    ["flavor"],
)

ADMISSION_LATENCY = Histogram(
    "jobtree_runs_admission_latency_seconds",
    "Time from first seeing a Run to its first decision: bound (Running), reserved or failed.",
    ["flavor", "result"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0),
)

EARLY_STARTS = Counter(
    "jobtree_runs_early_starts_total",
    "Reserved Runs that started before their Reservation's earliestStart (capacity freed early).",
)

BUDGET_CONCURRENCY = Gauge(
    "jobtree_budgets_concurrency_gpus",
    "GPUs held now by leases an envelope pays, by class (owned, shared, borrowed, spare).",
    ["owner", "budget", "envelope", "flavor", "class"],
)

SPARES_CONCURRENCY = Gauge(
    "jobtree_spares_concurrency_gpus",
    "GPUs an envelope pays for as spares now (held for swaps, charged at the spare factor).",
    ["owner", "budget", "envelope", "flavor"],
)

BUDGET_HEADROOM_GPUS = Gauge(
    "jobtree_budget_headroom_gpus",
    "Concurrency headroom of an envelope: GPUs it can still pay at once.",
    ["budget", "envelope"],
)

BUDGET_HEADROOM_GPU_HOURS = Gauge(
    "jobtree_budget_headroom_gpu_hours",
    "GPU-hours an envelope can still pay (only envelopes with maxGPUHours).",
    ["budget", "envelope"],
)

RECONCILES = Counter(
    "jobtree_admission_reconciles_total",
    "Run reconciles by outcome (settle, observe, hold, start, error).",
    ["outcome"],
)

COMMITS = Counter(
    "jobtree_admission_commits_total",
    "Commits admission sent to the binder, by reason (Start, Grow, Shrink) and result.",
    ["reason", "result"],
)

RUNS_CURRENT = Gauge(
    "jobtree_runs_current",
    "Runs by phase (Pending, Reserved, Running, Completed, Failed) and GPU flavor.",
    ["phase", "flavor"],
)

RUN_START_WAIT = Histogram(
    "jobtree_runs_start_wait_seconds",
    "Time from submission (creationTimestamp) to a Run's first Running, by flavor: the wait a "
    "researcher sees, Reservations included (admission latency stops at the first decision).",
    ["flavor"],
    buckets=(
        1.0,
        5.0,
        15.0,
        30.0,
        60.0,
        300.0,
        900.0,
        1800.0,
        3600.0,
        7200.0,
        14400.0,
        43200.0,
        86400.0,
        259200.0,
    ),
)
