"""Jobtree API (group ``rq.davidlangworthy.io``, version ``v1``): Budget, Run, Reservation, Lease.

pydantic models are the single source of truth: ``shared.api.crdgen`` generates the CRDs in
``crds/`` from them, so the API server and the code enforce the same schema and invariants.
"""

from shared.api.base import API_VERSION, CATEGORY, GROUP, VERSION
from shared.api.budget import Budget, BudgetSpec, BudgetStatus, Envelope
from shared.api.common import parse_duration
from shared.api.errors import ApiValidationError
from shared.api.kinds import KINDS, JobtreeObject, load_file, load_manifests, parse_object
from shared.api.lease import ClosureReason, Lease, LeaseReason, LeaseRole, LeaseSpec, LeaseStatus
from shared.api.reservation import Reservation, ReservationSpec, ReservationState, ReservationStatus
from shared.api.run import Run, RunPhase, RunSpec, RunStatus

__all__ = [
    "API_VERSION",
    "CATEGORY",
    "GROUP",
    "KINDS",
    "VERSION",
    "ApiValidationError",
    "Budget",
    "BudgetSpec",
    "BudgetStatus",
    "ClosureReason",
    "Envelope",
    "JobtreeObject",
    "Lease",
    "LeaseReason",
    "LeaseRole",
    "LeaseSpec",
    "LeaseStatus",
    "Reservation",
    "ReservationSpec",
    "ReservationState",
    "ReservationStatus",
    "Run",
    "RunPhase",
    "RunSpec",
    "RunStatus",
    "load_file",
    "load_manifests",
    "parse_duration",
    "parse_object",
]
