"""Prometheus metrics of the resolver (actions, lottery draws, preemptions by scope and reason)."""

from __future__ import annotations

from prometheus_client import Counter

ACTIONS = Counter(
    "jobtree_resolver_actions",
    "Resolver actions by kind: Bind, DropSpare, Shrink, RandomPreempt (one per cut unit), "
    "Blocked, Swap, FailureShrink, Requeue, Fail.",
    ["kind"],
)

DRAWS = Counter(
    "jobtree_lottery_draws",
    "Lottery draws made at Reservation activations (each ends one token).",
)

LOTTERIES = Counter(
    "jobtree_lotteries",
    "Lotteries run at activation, by outcome (cleared: the deficit was met; short: not).",
    ["outcome"],
)

PREEMPTIONS = Counter(
    "jobtree_preemptions",
    "Lease ends the resolver committed to make room, by scope label and closure reason "
    "(DropSpare, Shrink, RandomPreempt, ReclaimedBySpare).",
    ["scope", "reason"],
)

ACTIVATIONS = Counter(
    "jobtree_resolver_activations",
    "Reservation activations by outcome (Bind, Resolve, Blocked, AlreadyRunning, Canceled, "
    "Conflict, Unavailable, Early: refused before earliestStart).",
    ["outcome"],
)

EVENTS_REFUSED = Counter(
    "jobtree_resolver_events_refused",
    "Events the resolver did not believe, by reason (NodeNotFailed: a NODE_FAILED for a node "
    "that is Ready, or NotReady for less than the grace).",
    ["reason"],
)
