"""Pure conversions between Kubernetes objects (plain dicts) and the engine's value types.

The engine never sees Kubernetes objects and the shell never interprets fields itself: every
field-level decision about Nodes, Budgets, Runs, Reservations and Leases is made here, once, and
unit-tested without a server. Jobtree objects are read through the ``shared.api`` models, so
defaults (``desiredTotalGPUs`` = max, ``allowCrossGroupSpread`` = true, …) come from the same
definitions the CRDs are generated from. Malformed input raises :class:`TranslateError`.

What the Lease API has no field for travels in metadata written by :func:`lease_manifest`:
the funding kind (label ``rq.davidlangworthy.io/funding``, so audits can query it), the expected
end (annotation ``rq.davidlangworthy.io/expected-end``, start + maxDuration, what forecasts
replay), the Run's uid (label) and generation (annotation). A Reservation's GPU count is the
annotation ``rq.davidlangworthy.io/gpus`` written by the forecaster; an administrator's
Reservation without it claims the Run's narrowest start (``min_demand``).
"""

from __future__ import annotations

import copy
import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeVar

from shared.api import (
    API_VERSION,
    GROUP,
    Budget,
    Lease,
    Reservation,
    ReservationState,
    Run,
    parse_duration,
)
from shared.api.base import KubeObject
from shared.api.errors import ApiValidationError
from shared.api.lease import (
    LABEL_ROLE,
    LABEL_RUN,
    LeaseSpec,
    label_value,
    lease_labels,
)
from shared.engine import model as m
from shared.engine.bindplan import LeaseIntent, PodIntent
from shared.engine.capacity import NO_USE, PodUse, Use, parse_quantity, pod_requests, whole
from shared.engine.deficit import min_demand
from shared.engine.topology import DEFAULT_GPU_RESOURCE, MissingLabels, node_from_labels, pod_use

LABEL_FUNDING = f"{GROUP}/funding"
LABEL_RUN_UID = f"{GROUP}/run-uid"
LABEL_GROUP = f"{GROUP}/group"
LABEL_RANK = f"{GROUP}/rank"
ANNOTATION_EXPECTED_END = f"{GROUP}/expected-end"
ANNOTATION_RUN_GENERATION = f"{GROUP}/run-generation"
ANNOTATION_GPUS = f"{GROUP}/gpus"
"""On a Reservation: GPUs its intended slice holds for the Run (written by the forecaster)."""
ANNOTATION_CAPACITY_HOLD = f"{GROUP}/capacity-hold"
"""On a pod created without a Run template: it only holds GPUs, it is not a workload."""

HOLD_IMAGE = "registry.k8s.io/pause:3.10"
HOLD_CONTAINER = "capacity-hold"
MASTER_PORT = 29500
_CLAIMING = (None, ReservationState.PENDING, ReservationState.ACTIVE)
_POSITION = re.compile(r"^(GROUP|RANK|SPARE)\[([0-9]+)\]$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Obj = Mapping[str, Any]
_K = TypeVar("_K", bound=KubeObject)


class TranslateError(ValueError):
    """An object the engine cannot use; the caller logs it and skips the object."""


# ---------------------------------------------------------------------------- small helpers


def rfc3339(at: datetime) -> str:
    """UTC RFC 3339 with ``Z`` (microseconds kept: the ledger is exact to the microsecond)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """RFC 3339 → aware datetime (a missing offset is taken as UTC)."""
    at = datetime.fromisoformat(text)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise TranslateError("object has no metadata.name")
    return meta


def _strings(meta: Mapping[str, Any], field: str) -> Mapping[str, str]:
    value = meta.get(field)
    return value if isinstance(value, Mapping) else {}


def _parse(model: type[_K], obj: Obj) -> _K:
    try:
        return model.parse(obj)
    except ApiValidationError as exc:
        name = (obj.get("metadata") or {}).get("name")
        raise TranslateError(f"{model.__name__} {name}: {exc}") from exc


# ---------------------------------------------------------------------------- API → engine


def _amount(values: Mapping[str, Any], name: str) -> int:
    """One resource of a node's allocatable in its base unit (CPU in millicores); absent or
    malformed is 0, as the kubelet treats a resource it does not report."""
    amount = parse_quantity(values.get(name))
    if amount is None or amount < 0:
        return 0
    return whole(amount, 1000) if name == "cpu" else int(amount)


def node_capacity(allocatable: Mapping[str, Any]) -> m.NodeCapacity:
    """A node's allocatable CPU, memory, ephemeral storage and pod slots."""
    return m.NodeCapacity(
        cpu=_amount(allocatable, "cpu"),
        memory=_amount(allocatable, "memory"),
        ephemeral=_amount(allocatable, "ephemeral-storage"),
        pods=_amount(allocatable, "pods"),
    )


def _taints(spec: Mapping[str, Any]) -> tuple[m.Taint, ...]:
    out = []
    for taint in spec.get("taints") or ():
        if isinstance(taint, Mapping) and isinstance(taint.get("key"), str):
            out.append(
                m.Taint(str(taint["key"]), str(taint.get("value") or ""), str(taint.get("effect")))
            )
    return tuple(out)


def node_record(obj: Obj, *, resource: str = DEFAULT_GPU_RESOURCE) -> m.Node | MissingLabels:
    """A Node: Ready condition True → ready, ``spec.unschedulable`` → cordoned, GPUs and the rest
    of its allocatable, its taints."""
    meta = _meta(obj)
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    conditions = status.get("conditions") or []
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )
    allocatable = status.get("allocatable") or {}
    return node_from_labels(
        meta["name"],
        _strings(meta, "labels"),
        {k: str(v) for k, v in allocatable.items()},
        resource=resource,
        ready=ready,
        cordoned=bool(spec.get("unschedulable")),
        capacity=node_capacity(allocatable),
        taints=_taints(spec),
    )


def _request(
    resources: Mapping[str, Any], name: str, where: str, *, strict: bool, scale: int = 1
) -> int:
    """A container's request of one resource (its limit when no request is given, as the API
    server defaults it). ``strict``: a malformed value is an error naming the field."""
    for section in ("requests", "limits"):
        values = resources.get(section)
        if isinstance(values, Mapping) and name in values:
            amount = parse_quantity(values[name])
            if amount is None or amount < 0:
                if strict:
                    raise TranslateError(f"{where}.resources.{section}.{name}: bad quantity")
                return 0
            return whole(amount, scale)
    return 0


def _use(resources: object, gpu: str, where: str, *, strict: bool) -> Use:
    if not isinstance(resources, Mapping):
        return NO_USE
    return (
        _request(resources, gpu, where, strict=strict),
        _request(resources, "cpu", where, strict=strict, scale=1000),
        _request(resources, "memory", where, strict=strict),
        _request(resources, "ephemeral-storage", where, strict=strict),
    )


def _containers(spec: Mapping[str, Any], field: str) -> list[Mapping[str, Any]]:
    items = spec.get(field) or []
    return [c for c in items if isinstance(c, Mapping)] if isinstance(items, list) else []


def pod_spec_requests(
    spec: Mapping[str, Any], *, resource: str = DEFAULT_GPU_RESOURCE, where: str, strict: bool
) -> Use:
    """What a pod spec asks of its node, counted as Kubernetes counts it (init steps, sidecars,
    overhead): ``(GPUs, CPU millicores, memory bytes, ephemeral bytes)``."""
    containers = [
        _use(c.get("resources"), resource, f"{where}.containers[{i}]", strict=strict)
        for i, c in enumerate(_containers(spec, "containers"))
    ]
    init = [
        (
            _use(c.get("resources"), resource, f"{where}.initContainers[{i}]", strict=strict),
            c.get("restartPolicy") == "Always",
        )
        for i, c in enumerate(_containers(spec, "initContainers"))
    ]
    overhead = spec.get("overhead")
    extra = _use({"requests": overhead}, resource, f"{where}.overhead", strict=strict)
    return pod_requests(containers, init, extra)


def _tolerations(spec: Mapping[str, Any], where: str) -> tuple[m.Toleration, ...]:
    out = []
    for i, tol in enumerate(spec.get("tolerations") or ()):
        if not isinstance(tol, Mapping):
            raise TranslateError(f"{where}.tolerations[{i}]: not an object")
        operator = str(tol.get("operator") or "Equal")
        if operator not in ("Equal", "Exists"):
            raise TranslateError(f"{where}.tolerations[{i}].operator: {operator!r}")
        out.append(
            m.Toleration(
                key=str(tol.get("key") or ""),
                operator=operator,
                value=str(tol.get("value") or ""),
                effect=str(tol.get("effect") or ""),
            )
        )
    return tuple(out)


_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")


def _affinity(spec: Mapping[str, Any], where: str) -> tuple[tuple[m.Requirement, ...], ...]:
    """Required node affinity terms (``requiredDuringSchedulingIgnoredDuringExecution``)."""
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = []
    path = f"{where}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    for t, term in enumerate(required.get("nodeSelectorTerms") or ()):
        reqs = []
        for kind, is_field in (("matchExpressions", False), ("matchFields", True)):
            for r, expr in enumerate((term or {}).get(kind) or ()):
                at = f"{path}.nodeSelectorTerms[{t}].{kind}[{r}]"
                operator = (expr or {}).get("operator")
                if operator not in _OPERATORS or not isinstance(expr.get("key"), str):
                    raise TranslateError(f"{at}: needs a key and an operator in {_OPERATORS}")
                values = tuple(str(v) for v in expr.get("values") or ())
                reqs.append(m.Requirement(expr["key"], operator, values, is_field))
        terms.append(tuple(reqs))
    return tuple(terms)


def pod_needs(template: object) -> m.PodNeeds:
    """What each rank's pod built from a Run's ``spec.template`` needs of its node besides GPUs.

    GPUs are left out: the binder sets them per rank from the placement. A malformed quantity,
    toleration or affinity term is a TranslateError naming the field.
    """
    if not isinstance(template, Mapping):
        return m.NO_NEEDS
    spec = template.get("spec")
    if not isinstance(spec, Mapping):
        return m.NO_NEEDS
    where = "spec.template.spec"
    _, cpu, memory, ephemeral = pod_spec_requests(spec, where=where, strict=True)
    selector = spec.get("nodeSelector") or {}
    if not isinstance(selector, Mapping):
        raise TranslateError(f"{where}.nodeSelector: not a map")
    needs = m.PodNeeds(
        cpu=cpu,
        memory=memory,
        ephemeral=ephemeral,
        tolerations=_tolerations(spec, where),
        node_selector=MappingProxyType({str(k): str(v) for k, v in selector.items()}),
        affinity=_affinity(spec, where),
    )
    return m.NO_NEEDS if needs == m.NO_NEEDS else needs


_TERMINAL = ("Succeeded", "Failed")


def jobtree_owned(meta: Mapping[str, Any]) -> bool:
    """A pod whose controller is a Run: Jobtree's own, its GPUs are counted by its Lease."""
    for ref in meta.get("ownerReferences") or ():
        if (
            isinstance(ref, Mapping)
            and ref.get("controller")
            and ref.get("kind") == "Run"
            and str(ref.get("apiVersion") or "").startswith(f"{GROUP}/")
        ):
            return True
    return False


def pod_usage(obj: Obj, *, resource: str = DEFAULT_GPU_RESOURCE) -> tuple[str, PodUse] | None:
    """(node, counted requests) of a pod that holds capacity; None when unbound or terminal.

    Every pod counts CPU, memory, ephemeral storage and a pod slot; GPUs only when Jobtree did
    not create it (its own pods' GPUs are their Leases', counted once by the topology).
    """
    spec = obj.get("spec") or {}
    node = spec.get("nodeName")
    phase = (obj.get("status") or {}).get("phase")
    if not isinstance(node, str) or not node or phase in _TERMINAL:
        return None
    meta = obj.get("metadata") or {}
    gpus, cpu, memory, ephemeral = pod_spec_requests(
        spec, resource=resource, where="spec", strict=False
    )
    return node, (0 if jobtree_owned(meta) else gpus, cpu, memory, ephemeral)


def slim_pod(obj: Obj, *, resource: str = DEFAULT_GPU_RESOURCE) -> dict[str, Any]:
    """The little of a Pod a capacity cache keeps: identity and ``usage`` ((node, counted
    requests) or None), so 100,000 pods cost about a kilobyte each, not several."""
    meta = obj.get("metadata") or {}
    used = pod_usage(obj, resource=resource)
    if used is not None:  # node names and request shapes repeat: share them
        used = (sys.intern(used[0]), pod_use(used[1]))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta
        },
        "usage": used,
    }


def slim_usage(obj: Obj | None) -> tuple[str, PodUse] | None:
    """The (node, counted requests) a ``slim_pod`` carries."""
    usage = None if obj is None else obj.get("usage")
    if not isinstance(usage, tuple) or len(usage) != 2:
        return None
    node, use = usage
    return str(node), use


def budget_record(obj: Obj) -> m.Budget:
    """A Budget with its envelopes keyed ``<budget>/<envelope>`` (caps name those keys)."""
    budget = _parse(Budget, obj)
    name, spec = str(budget.metadata.name), budget.spec
    envelopes = []
    for env in spec.envelopes:
        pre, lend = env.pre_activation, env.lending
        envelopes.append(
            m.Envelope(
                budget=name,
                owner=spec.owner,
                name=env.name,
                flavor=env.flavor,
                selector=MappingProxyType(dict(env.selector)),
                concurrency=env.concurrency,
                max_gpu_hours=env.max_gpu_hours,
                start=env.start,
                end=env.end,
                reservations_before_start=bool(pre and pre.allow_reservations),
                admission_before_start=bool(pre and pre.allow_admission),
                lending=m.Lending()
                if lend is None
                else m.Lending(
                    allow=lend.allow,
                    to=tuple(lend.to or ()),
                    max_concurrency=lend.max_concurrency,
                    max_gpu_hours=lend.max_gpu_hours,
                ),
            )
        )
    caps = tuple(
        m.AggregateCap(
            budget=name,
            name=cap.name,
            flavor=cap.flavor,
            envelopes=tuple(f"{name}/{e}" for e in cap.envelopes),
            max_concurrency=cap.max_concurrency,
            max_gpu_hours=cap.max_gpu_hours,
        )
        for cap in spec.aggregate_caps or ()
    )
    return m.Budget(
        name=name,
        owner=spec.owner,
        parents=tuple(spec.parents or ()),
        envelopes=tuple(envelopes),
        caps=caps,
    )


def run_request(obj: Obj) -> m.RunRequest:
    """What a Run asks for: ``total_gpus`` is ``spec.resources.totalGPUs`` (the start width)."""
    run = _parse(Run, obj)
    spec, meta = run.spec, run.metadata
    if not meta.namespace:
        raise TranslateError(f"Run {meta.name}: no namespace")
    locality, runtime, funding, mall = spec.locality, spec.runtime, spec.funding, spec.malleable
    return m.RunRequest(
        key=(meta.namespace, str(meta.name)),
        uid=meta.uid or "",
        owner=spec.owner,
        flavor=spec.resources.gpu_type,
        total_gpus=spec.resources.total_gpus,
        group_gpus=locality.group_gpus if locality else None,
        allow_cross_group_spread=locality.allow_cross_group_spread if locality else True,
        selector=MappingProxyType(dict(locality.selector or {}) if locality else {}),
        spares_per_group=spec.spares_per_group,
        malleable=None
        if mall is None
        else m.Malleable(
            min_gpus=mall.min_total_gpus,
            max_gpus=mall.max_total_gpus,
            step_gpus=mall.step_gpus,
            desired_gpus=mall.desired_total_gpus or mall.max_total_gpus,
        ),
        allow_borrow=funding.allow_borrow if funding else False,
        max_borrow_gpus=funding.max_borrow_gpus if funding else None,
        sponsors=tuple(funding.sponsors or ()) if funding else (),
        max_duration=parse_duration(runtime.max_duration)
        if runtime and runtime.max_duration
        else None,
        checkpoint=parse_duration(runtime.checkpoint) if runtime and runtime.checkpoint else None,
        max_restarts=runtime.max_restarts if runtime else 0,
        opportunistic=spec.opportunistic,
        pod=pod_needs((obj.get("spec") or {}).get("template")),
    )


def comp_position(comp_path: Sequence[str] | None) -> tuple[int, int]:
    """(group, rank) from ``["GROUP[g]", "RANK[r]"]``; rank −1 for ``SPARE[i]`` or no rank."""
    group, rank = 0, -1
    for part in comp_path or ():
        match = _POSITION.match(part)
        if match is None:
            continue
        kind, value = match.group(1), int(match.group(2))
        if kind == "GROUP":
            group = value
        elif kind == "RANK":
            rank = value
        else:
            rank = -1
    return group, rank


def _funding(labels: Mapping[str, str], owner: str, payer: str) -> m.FundingKind:
    """The funding label; without it the payer's relation is all that is known: owned when the
    payer is the owner, else family (sponsor leases are always written with the label)."""
    try:
        return m.FundingKind(labels[LABEL_FUNDING])
    except (KeyError, ValueError):
        return m.FundingKind.OWNED if payer == owner else m.FundingKind.FAMILY


def _time_annotation(annotations: Mapping[str, str], key: str) -> datetime | None:
    text = annotations.get(key)
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise TranslateError(f"annotation {key}: {exc}") from exc


def lease_record(obj: Obj) -> m.Lease:
    """An engine Lease (one node: the first of ``slice.nodes``) with its closure, if closed."""
    lease = _parse(Lease, obj)
    spec, meta, status = lease.spec, lease.metadata, lease.status
    group, rank = comp_position(spec.comp_path)
    closed = status is not None and status.closed
    return m.Lease(
        name=str(meta.name),
        run=(spec.run_ref.namespace, spec.run_ref.name),
        owner=spec.owner,
        node=spec.slice.nodes[0],
        gpus=spec.slice.gpus,
        role=m.Role(spec.slice.role.value),
        group=group,
        rank=rank,
        envelope=f"{spec.paid_by_budget}/{spec.paid_by_envelope}",
        payer_owner=spec.paid_by_owner,
        funding=_funding(meta.labels or {}, spec.owner, spec.paid_by_owner),
        start=spec.interval.start,
        reason=m.LeaseReason(spec.reason.value),
        end=status.end_time if closed and status else None,
        closure=status.closure_reason if closed and status else None,
        expected_end=_time_annotation(meta.annotations or {}, ANNOTATION_EXPECTED_END),
    )


def reservation_run_key(obj: Obj) -> m.RunKey:
    """The Run a Reservation serves (``runRef.namespace`` defaults to its own namespace)."""
    meta, ref = _meta(obj), (obj.get("spec") or {}).get("runRef") or {}
    namespace, name = ref.get("namespace") or meta.get("namespace"), ref.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str):
        raise TranslateError(f"Reservation {meta['name']}: runRef needs a name and namespace")
    return namespace, name


def claim_record(obj: Obj, run: m.RunRequest | None = None) -> m.ReservationClaim | None:
    """The capacity a Pending/Active Reservation protects; None once it no longer claims.

    GPUs come from the ``gpus`` annotation, else the Run's narrowest start; with neither the
    claim is unknowable (TranslateError). Its duration is the Run's maxDuration; without the Run
    (or without a walltime) the claim is open-ended.
    """
    resv = _parse(Reservation, obj)
    spec, meta = resv.spec, resv.metadata
    if (resv.status.state if resv.status else None) not in _CLAIMING:
        return None
    run_key = reservation_run_key(obj)
    text = (meta.annotations or {}).get(ANNOTATION_GPUS)
    if text is not None:
        if not text.isdigit():
            raise TranslateError(f"Reservation {meta.name}: bad {ANNOTATION_GPUS}={text!r}")
        gpus = int(text)
    elif run is not None:
        gpus = min_demand(run)
    else:
        raise TranslateError(f"Reservation {meta.name}: no {ANNOTATION_GPUS} and no Run")
    return m.ReservationClaim(
        name=str(meta.name),
        run=run_key,
        earliest_start=spec.earliest_start,
        nodes=tuple(spec.intended_slice.nodes or ()),
        gpus=gpus,
        envelope=spec.paying_envelope,
        duration=run.max_duration if run is not None else None,
        owner=run.owner if run is not None else None,
    )


# ---------------------------------------------------------------------------- engine → API


def lease_manifest(
    intent: LeaseIntent, *, budget: str | None = None, run_uid: str, gen: int
) -> dict[str, Any]:
    """The Lease object one slice of a bind creates (validated against the API model).

    ``intent.envelope`` is the engine key ``<budget>/<envelope>``; ``budget`` is only needed for
    a bare envelope name and must agree with the key otherwise. ``gen`` is the Run generation
    the bind was computed from.
    """
    key_budget, sep, envelope = intent.envelope.rpartition("/")
    if not sep:
        key_budget, envelope = budget or "", intent.envelope
    if not key_budget or (budget is not None and budget != key_budget):
        raise ValueError(f"lease {intent.name}: budget {budget!r} vs envelope {intent.envelope!r}")
    spec = LeaseSpec.model_validate(
        {
            "owner": intent.owner,
            "runRef": {"name": intent.run[1], "namespace": intent.run[0]},
            "compPath": list(intent.comp_path),
            "slice": {"nodes": [intent.node], "gpus": intent.gpus, "role": intent.role.value},
            "interval": {"start": rfc3339(intent.start)},
            "paidByEnvelope": envelope,
            "paidByBudget": key_budget,
            "paidByOwner": intent.payer_owner,
            "reason": intent.reason.value,
        }
    )
    labels = lease_labels(spec)
    labels[LABEL_FUNDING] = intent.funding.value
    labels[LABEL_RUN_UID] = label_value(run_uid)
    annotations = {ANNOTATION_RUN_GENERATION: str(gen)}
    if intent.expected_end is not None:
        annotations[ANNOTATION_EXPECTED_END] = rfc3339(intent.expected_end)
    return {
        "apiVersion": API_VERSION,
        "kind": "Lease",
        "metadata": {"name": intent.name, "labels": labels, "annotations": annotations},
        "spec": spec.dump(),
    }


def service_name(run_name: str) -> str:
    """The Run's headless Service name: a DNS-1035 label (run names may be longer or dotted)."""
    if _DNS1035.match(run_name) and len(run_name) <= 63:
        return run_name
    digest = hashlib.sha256(run_name.encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", run_name.lower())[:50].strip("-")
    return f"r-{stem}-{digest}" if stem else f"r-{digest}"


def _run_identity(run_obj: Obj) -> tuple[str, str, dict[str, Any]]:
    """(namespace, name, owner reference) of a Run object: pods and Services it owns."""
    meta = _meta(run_obj)
    namespace, uid = meta.get("namespace"), meta.get("uid")
    if not isinstance(namespace, str) or not isinstance(uid, str):
        raise TranslateError(f"Run {meta['name']}: needs metadata.namespace and metadata.uid")
    ref = {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "name": meta["name"],
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": False,
    }
    return namespace, meta["name"], ref


def _set_gpus(containers: list[dict[str, Any]], resource: str, gpus: int) -> None:
    """All GPUs on the first container; none anywhere else, so the pod asks for exactly them."""
    for index, container in enumerate(containers):
        resources = container.setdefault("resources", {})
        for section in ("limits", "requests"):
            values = resources.get(section)
            if isinstance(values, dict):
                values.pop(resource, None)
        if index == 0:
            resources.setdefault("limits", {})[resource] = str(gpus)
            if isinstance(resources.get("requests"), dict):
                resources["requests"][resource] = str(gpus)


def pod_manifest(
    intent: PodIntent,
    run_obj: Obj,
    *,
    resource: str = DEFAULT_GPU_RESOURCE,
    hold_image: str = HOLD_IMAGE,
    service_name: str,
) -> dict[str, Any]:
    """One rank's pod, bound to its node by ``nodeName`` and owned by the Run.

    Built from ``spec.template``; without one (or without containers) a single hold container
    keeps the GPUs: a capacity hold, marked as such, never a workload.
    """
    namespace, run_name, owner_ref = _run_identity(run_obj)
    if (namespace, run_name) != intent.run:
        raise ValueError(f"pod {intent.name} belongs to {intent.run}, not {namespace}/{run_name}")
    template = copy.deepcopy((run_obj.get("spec") or {}).get("template") or {})
    tmeta = template.get("metadata") or {}
    spec: dict[str, Any] = template.get("spec") or {}
    containers: list[dict[str, Any]] = spec.get("containers") or []
    hold = not containers
    if hold:
        containers = [{"name": HOLD_CONTAINER, "image": hold_image}]
    env = [
        {"name": "WORLD_SIZE", "value": str(intent.world_size)},
        {"name": "RANK", "value": str(intent.rank)},
        {"name": "GROUP", "value": str(intent.group)},
        {"name": "MASTER_ADDR", "value": f"{intent.master}.{service_name}.{namespace}.svc"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    ours = {e["name"] for e in env}
    for container in containers:
        kept = [e for e in container.get("env") or [] if e.get("name") not in ours]
        container["env"] = kept + env
    _set_gpus(containers, resource, intent.gpus)
    spec.update(
        containers=containers,
        nodeName=intent.node,
        restartPolicy="Never",
        hostname=intent.name,
        subdomain=service_name,
    )
    labels = {
        **_strings(tmeta, "labels"),
        LABEL_RUN: label_value(run_name),
        LABEL_GROUP: str(intent.group),
        LABEL_RANK: str(intent.rank),
        LABEL_ROLE: intent.role.value,
    }
    metadata: dict[str, Any] = {
        "name": intent.name,
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner_ref],
    }
    annotations = dict(_strings(tmeta, "annotations"))
    if hold:
        annotations[ANNOTATION_CAPACITY_HOLD] = "true"
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def headless_service(run_obj: Obj) -> dict[str, Any]:
    """The Run's headless Service: gives every rank's pod a DNS name for the rendezvous."""
    namespace, run_name, owner_ref = _run_identity(run_obj)
    selector = {LABEL_RUN: label_value(run_name)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(run_name),
            "namespace": namespace,
            "labels": dict(selector),
            "ownerReferences": [owner_ref],
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }
