"""The binder's Prometheus metrics (process-wide; names follow the ``jobtree_binder_`` prefix)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

COMMITS = Counter(
    "jobtree_binder_commits_total",
    "Commits handled, by result: ok (something written), noop (already applied), rejected "
    "(conflict, nothing written), error (the API server failed part-way; re-send completes it).",
    ["result"],
)

CONFLICTS = Counter(
    "jobtree_binder_conflicts_total",
    "Commits rejected by the binder's re-check, by reason (NodeCapacity, EnvelopeConcurrency, …).",
    ["reason"],
)

COMMIT_SECONDS = Histogram(
    "jobtree_binder_commit_seconds",
    "Time to check and apply one commit, lock wait included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

LEASES = Counter(
    "jobtree_binder_leases_total",
    "Leases the binder opened or closed; closed ones by closure reason (RandomPreempt(<seed>) "
    "is counted as RandomPreempt).",
    ["event", "closure"],
)

LIFECYCLE = Counter(
    "jobtree_binder_lifecycle_total",
    "Gangs the binder ended on its own: Completed, Fail, TimeLimit, Canceled.",
    ["closure"],
)

PODS = Counter(
    "jobtree_binder_pods_total",
    "Pod writes by action: created, deleted, replaced.",
    ["action"],
)

JOURNAL_REPLAYS = Counter(
    "jobtree_binder_journal_replays_total",
    "Journaled commits re-applied after a crash or a failed apply: completed, dropped (rejected "
    "now, e.g. the Run is gone), error (the API server failed again; retried).",
    ["result"],
)

LEADER = Gauge(
    "jobtree_binder_leader",
    "1 while this binder instance is the active writer.",
)
