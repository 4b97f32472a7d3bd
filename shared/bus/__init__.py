"""The NATS bus every Jobtree service talks on: typed messages, the subject catalog, and the
``ServiceRuntime`` shell (endpoints, subscriptions, dead letters, probes, metrics).

Import the pieces from here: ``from shared.bus import PLAN, PlanRequest, ServiceRuntime``.
"""

from shared.bus.config import ServiceConfig, service_args
from shared.bus.logs import configure_logging
from shared.bus.messages import (
    ActivateReply,
    ActivateRequest,
    CommitReply,
    CommitRequest,
    DeadLetter,
    LeaseEnd,
    LedgerEvent,
    Message,
    NodeFailed,
    PlanReply,
    PlanRequest,
    ReserveReply,
    ReserveRequest,
    RunChanged,
    RunRef,
    decode,
    encode,
)
from shared.bus.runtime import BusError, Refused, ServiceRuntime
from shared.bus.subjects import (
    ACTIVATE,
    CATALOG,
    COMMIT,
    DEADLETTER,
    LEDGER,
    NODE_FAILED,
    PLAN,
    RESERVE,
    RUN_CHANGED,
    UNRESERVABLE,
    Subject,
    deadletter_of,
    deadletter_subject,
)

__all__ = [
    "ACTIVATE",
    "CATALOG",
    "COMMIT",
    "DEADLETTER",
    "LEDGER",
    "NODE_FAILED",
    "PLAN",
    "RESERVE",
    "RUN_CHANGED",
    "UNRESERVABLE",
    "ActivateReply",
    "ActivateRequest",
    "BusError",
    "CommitReply",
    "CommitRequest",
    "DeadLetter",
    "LeaseEnd",
    "LedgerEvent",
    "Message",
    "NodeFailed",
    "PlanReply",
    "PlanRequest",
    "Refused",
    "ReserveReply",
    "ReserveRequest",
    "RunChanged",
    "RunRef",
    "ServiceConfig",
    "ServiceRuntime",
    "Subject",
    "configure_logging",
    "deadletter_of",
    "deadletter_subject",
    "decode",
    "encode",
    "service_args",
]
