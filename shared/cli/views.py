"""Pure views for ``kubectl runs``: API objects (plain dicts) in, JSON-ready records out.

Each command of the CLI shell fetches objects, reads the clock once and hands both here. The
functions return records (dicts with camelCase keys, like the API) that the shell prints as a
table, JSON or YAML. Nothing here does I/O or reads a clock, so every figure the CLI shows —
ETAs, headroom, funding, lottery replays — is unit-tested from sample objects.

Objects are read defensively: a field the API server would never store (or a newer controller
added) never makes a view fail; missing values read as absent. Figures that need the engine are
computed by the engine itself (``shared.engine.accounting`` for usage and headroom,
``shared.engine.lottery`` for replaying a published lottery), through ``shared.kube.translate``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.api import ApiValidationError, Run
from shared.api.common import OWNER_PATTERN
from shared.api.lease import LABEL_NAMESPACE, LABEL_RUN, label_value
from shared.engine import lottery
from shared.engine.accounting import cap_headroom, headroom, run_funding, usage_from_ledger
from shared.engine.exclusions import excluded_nodes
from shared.engine.family import Family
from shared.engine.model import DOMAIN_LABELS, RunKey
from shared.engine.model import Budget as BudgetRecord
from shared.engine.model import Lease as LeaseRecord
from shared.engine.model import Node as NodeRecord
from shared.engine.topology import PodChange, Topology
from shared.kube.resources import object_key
from shared.kube.translate import (
    LABEL_FUNDING,
    LABEL_GROUP,
    LABEL_RANK,
    TranslateError,
    budget_record,
    comp_position,
    lease_record,
    node_record,
    pod_usage,
    run_request,
)

Obj = Mapping[str, Any]
Record = dict[str, Any]

TERMINAL_PHASES = ("Completed", "Failed")
LIVE_RESERVATION_STATES = ("Pending", "Active", "Blocked")
CONFIDENCE_MEANING = {
    "window-aligned": "a budget window opens at that instant (the paying envelope's start)",
    "walltime": "running leases end by then at the latest (their maxDuration walltime)",
    "conservative": "nothing in the horizon bounds it: a configured lead, not a computed instant",
}
"""What an ETA rests on, for each forecast confidence label."""
_RANDOM_PREEMPT = re.compile(r"^RandomPreempt\(([0-9A-Za-z]+)\)$")
_OWNER = re.compile(OWNER_PATTERN)


class ViewError(ValueError):
    """A request the CLI refuses; the message is one line a user can act on."""


# ---------------------------------------------------------------------------- field access


def as_map(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` when it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def as_int(value: Any, default: int = 0) -> int:
    """An integer field (bools and junk read as ``default``)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def name_of(obj: Obj) -> str:
    return as_str(as_map(obj.get("metadata")).get("name")) or ""


def namespace_of(obj: Obj) -> str | None:
    return as_str(as_map(obj.get("metadata")).get("namespace"))


def run_label(key: RunKey) -> str:
    """``namespace/name``: how Reservations and audits name a Run."""
    return f"{key[0]}/{key[1]}"


def run_key_of(run: Obj) -> RunKey:
    """(namespace, name) of a Run object."""
    return namespace_of(run) or "", name_of(run)


def split_run_ref(text: str, default_namespace: str) -> RunKey:
    """``name`` or ``namespace/name`` → (namespace, name)."""
    namespace, sep, name = text.partition("/")
    if not sep:
        return default_namespace, text
    if not namespace or not name or "/" in name:
        raise ViewError(f"invalid run reference {text!r}: use NAME or NAMESPACE/NAME")
    return namespace, name


def parse_ts(value: Any) -> datetime | None:
    """An RFC 3339 field as an aware datetime; None when absent or unreadable."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def iso(at: datetime | None) -> str | None:
    """UTC RFC 3339 with ``Z``, whole seconds."""
    if at is None:
        return None
    return at.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def human_duration(seconds: float) -> str:
    """The two largest units: ``42s``, ``12m5s``, ``3h12m``, ``2d4h``, ``4y12d``."""
    total = int(abs(seconds))
    units = (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    for suffix, size in units:
        if total >= size:
            count, total = divmod(total, size)
            parts.append(f"{count}{suffix}")
        elif parts:
            break
        if len(parts) == 2:
            break
    return "".join(parts) or "0s"


def relative(at: datetime | None, now: datetime) -> str:
    """``in 3h12m``, ``5m ago`` or ``now`` (within a second)."""
    if at is None:
        return "-"
    delta = (at - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    return f"in {human_duration(delta)}" if delta > 0 else f"{human_duration(delta)} ago"


def age(obj: Obj, now: datetime) -> str:
    """Time since creation, like kubectl's AGE column."""
    created = parse_ts(as_map(obj.get("metadata")).get("creationTimestamp"))
    return "-" if created is None else human_duration((now - created).total_seconds())


def owner_matches(owner: str, query: str | None, family: Family) -> bool:
    """``--owner``: exact owner, one below it in the family tree, or a glob.

    The family is the tree of Budgets that exist (SPEC §2): ``org:ai`` matches ``org:ai:rai:sys``
    only when the Budgets link them (a Budget for ``org:ai:rai``, or ``spec.parents``), never by
    the path prefix alone — use a glob (``org:ai:*``) to select by path.
    """
    if not query:
        return True
    if any(c in query for c in "*?["):
        return fnmatch.fnmatchcase(owner, query)
    return owner == query or query in family.parents_of(owner)


def lease_selector(key: RunKey) -> str:
    """Label selector of a Run's Leases (label values as ``lease_labels`` writes them)."""
    return f"{LABEL_RUN}={label_value(key[1])},{LABEL_NAMESPACE}={label_value(key[0])}"


def pod_selector(key: RunKey) -> str:
    """Label selector of a Run's pods (in the Run's namespace)."""
    return f"{LABEL_RUN}={label_value(key[1])}"


def lease_run_key(lease: Obj) -> RunKey:
    ref = as_map(as_map(lease.get("spec")).get("runRef"))
    return as_str(ref.get("namespace")) or "", as_str(ref.get("name")) or ""


def leases_of(key: RunKey, leases: Iterable[Obj]) -> list[Obj]:
    """The Run's Leases (exact runRef: label values may be truncated), oldest first."""
    mine = [lease for lease in leases if lease_run_key(lease) == key]
    return sorted(mine, key=_lease_order)


def _lease_order(lease: Obj) -> tuple[str, str]:
    start = as_map(as_map(lease.get("spec")).get("interval")).get("start")
    return (str(start or ""), name_of(lease))


def closure_seed(closure: str | None) -> str | None:
    """The seed named by a ``RandomPreempt(<seed>)`` closure."""
    match = _RANDOM_PREEMPT.match(closure or "")
    return match.group(1) if match else None


def reservation_run_key(resv: Obj) -> RunKey:
    ref = as_map(as_map(resv.get("spec")).get("runRef"))
    return (
        as_str(ref.get("namespace")) or namespace_of(resv) or "",
        as_str(ref.get("name")) or "",
    )


def pick_reservation(run: Obj, reservations: Iterable[Obj]) -> Obj | None:
    """The Reservation that speaks for the Run now.

    ``status.pendingReservation`` when it exists; else the Run's live Reservation (Pending,
    Active, Blocked), newest first; else its newest one of any state.
    """
    key = run_key_of(run)
    mine = [r for r in reservations if reservation_run_key(r) == key]
    wanted = as_str(as_map(run.get("status")).get("pendingReservation"))
    for resv in mine:
        if wanted and name_of(resv) == wanted:
            return resv

    def order(resv: Obj) -> tuple[bool, str, str]:
        state = as_map(resv.get("status")).get("state") or "Pending"
        created = str(as_map(resv.get("metadata")).get("creationTimestamp") or "")
        return (state in LIVE_RESERVATION_STATES, created, name_of(resv))

    return max(mine, key=order) if mine else None


# ---------------------------------------------------------------------------- runs


def conditions(obj: Obj) -> list[Record]:
    """Status conditions as records (type, status, reason, message, since)."""
    out: list[Record] = []
    for cond in as_list(as_map(obj.get("status")).get("conditions")):
        cond = as_map(cond)
        if not as_str(cond.get("type")):
            continue
        out.append(
            {
                "type": cond["type"],
                "status": as_str(cond.get("status")) or "Unknown",
                "reason": as_str(cond.get("reason")),
                "message": as_str(cond.get("message")),
                "since": as_str(cond.get("lastTransitionTime")),
            }
        )
    return out


def run_reason(run: Obj) -> str | None:
    """The typed reason behind the phase: Failed's reason, else the blocking condition's."""
    conds = conditions(run)
    for wanted, status in (("Failed", "True"), ("Scheduled", "False")):
        for cond in conds:
            if cond["type"] == wanted and cond["status"] == status and cond["reason"]:
                return str(cond["reason"])
    for cond in conds:
        if cond["type"] != "AtRisk" and cond["status"] == "False" and cond["reason"]:
            return str(cond["reason"])
    return None


def request_summary(run: Obj) -> Record:
    """What the Run asks for: flavor, width, groups, elasticity, walltime, co-funding."""
    spec = as_map(run.get("spec"))
    resources, locality = as_map(spec.get("resources")), as_map(spec.get("locality"))
    malleable, funding = as_map(spec.get("malleable")), as_map(spec.get("funding"))
    runtime = as_map(spec.get("runtime"))
    out: Record = {
        "gpuType": as_str(resources.get("gpuType")),
        "totalGPUs": as_int(resources.get("totalGPUs")),
    }
    if locality.get("groupGPUs") is not None:
        out["groupGPUs"] = as_int(locality.get("groupGPUs"))
    if malleable:
        out["malleable"] = {
            "min": as_int(malleable.get("minTotalGPUs")),
            "max": as_int(malleable.get("maxTotalGPUs")),
            "step": as_int(malleable.get("stepGPUs")),
            "desired": desired_width(run),
        }
    if as_int(spec.get("sparesPerGroup")):
        out["sparesPerGroup"] = as_int(spec.get("sparesPerGroup"))
    if as_str(runtime.get("maxDuration")):
        out["maxDuration"] = runtime["maxDuration"]
    if funding:
        out["allowBorrow"] = bool(funding.get("allowBorrow"))
        out["sponsors"] = [s for s in as_list(funding.get("sponsors")) if isinstance(s, str)]
    return out


def request_text(summary: Mapping[str, Any]) -> str:
    """``128 × H100-80GB in groups of 32, malleable 64–128 step 32, walltime 4h``."""
    text = f"{summary.get('totalGPUs')} × {summary.get('gpuType') or '?'}"
    if summary.get("groupGPUs"):
        text += f" in groups of {summary['groupGPUs']}"
    mall = as_map(summary.get("malleable"))
    if mall:
        text += (
            f", malleable {mall['min']}–{mall['max']} step {mall['step']} "
            f"(desired {mall['desired']})"
        )
    if summary.get("sparesPerGroup"):
        text += f", {summary['sparesPerGroup']} spare/group"
    if summary.get("maxDuration"):
        text += f", walltime {summary['maxDuration']}"
    return text


def desired_width(run: Obj) -> int:
    """``spec.malleable.desiredTotalGPUs`` with its model default (maxTotalGPUs)."""
    malleable = as_map(as_map(run.get("spec")).get("malleable"))
    desired = malleable.get("desiredTotalGPUs")
    return as_int(desired) if desired is not None else as_int(malleable.get("maxTotalGPUs"))


def width_record(run: Obj) -> Record:
    width = as_map(as_map(run.get("status")).get("width"))
    return {k: as_int(width.get(k)) for k in ("min", "max", "desired", "allocated", "pending")}


def width_text(width: Mapping[str, Any]) -> str:
    text = f"{width.get('allocated', 0)} allocated of {width.get('desired', 0)} desired"
    if width.get("pending"):
        text += f", {width['pending']} pending"
    if width.get("max"):
        text += f" (bounds {width.get('min', 0)}–{width['max']})"
    return text


def funding_record(run: Obj) -> Record:
    funding = as_map(as_map(run.get("status")).get("funding"))
    out: Record = {}
    for key in ("owned", "shared", "borrowed"):
        out[f"{key}GPUs"] = as_int(funding.get(f"{key}GPUs"))
        hours = funding.get(f"{key}GPUHours")
        out[f"{key}GPUHours"] = float(hours) if isinstance(hours, int | float) else 0.0
    out["sponsors"] = [
        {
            "owner": as_str(as_map(s).get("owner")),
            "kind": as_str(as_map(s).get("kind")),
            "gpus": as_int(as_map(s).get("gpus")),
            "gpuHours": float(as_map(s).get("gpuHours") or 0.0),
        }
        for s in as_list(funding.get("sponsors"))
    ]
    return out


def funding_text(funding: Mapping[str, Any]) -> str:
    """``96 owned, 0 shared, 32 borrowed GPUs (sponsor org:vision 32)``."""
    text = (
        f"{funding.get('ownedGPUs', 0)} owned, {funding.get('sharedGPUs', 0)} shared, "
        f"{funding.get('borrowedGPUs', 0)} borrowed GPUs"
    )
    payers = [
        f"{s.get('kind')} {s.get('owner')} {s.get('gpus')}" for s in funding.get("sponsors") or ()
    ]
    return text + (f" ({', '.join(payers)})" if payers else "")


def at_risk(run: Obj) -> Record | None:
    for cond in conditions(run):
        if cond["type"] == "AtRisk" and cond["status"] == "True":
            return {"reason": cond["reason"], "message": cond["message"]}
    return None


# ---------------------------------------------------------------------------- plan


def scope_text(scope: Mapping[str, Any]) -> str:
    """``Location H100-80GB us-west/gpu-a/nv-a`` or ``Funding H100-80GB west-h100/env``."""
    if not scope:
        return "-"
    kind = scope.get("kind") or "Location"
    flavor = scope.get("flavor") or "?"
    if kind == "Funding":
        where = "/".join(str(p) for p in (scope.get("budget"), scope.get("envelope")) if p)
        return f"Funding {flavor} envelope {where or '?'}"
    selector = as_map(scope.get("selector"))
    where = "/".join(str(selector.get(k, "*")) for k in DOMAIN_LABELS) if selector else "anywhere"
    extra = {k: v for k, v in selector.items() if k not in DOMAIN_LABELS}
    if extra:
        where += " " + ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return f"Location {flavor} {where}"


def domain_text(domain: Mapping[str, Any]) -> str:
    return "/".join(str(domain.get(k, "?")) for k in DOMAIN_LABELS) if domain else "-"


def reservation_record(resv: Obj, now: datetime) -> Record:
    """A Reservation's promise and forecast: ETA, countdown, deficit, remedies, risk."""
    spec, status = as_map(resv.get("spec")), as_map(resv.get("status"))
    forecast = as_map(status.get("forecast"))
    eta = parse_ts(spec.get("earliestStart"))
    state = as_str(status.get("state")) or "Pending"
    odds = as_map(forecast.get("killProbability"))
    conflict = [
        {"run": run, "killProbability": odds.get(run)}
        for run in as_list(forecast.get("conflictSet"))
        if isinstance(run, str)
    ]
    remedies = [
        {
            "action": as_str(as_map(r).get("action")),
            "run": as_str(as_map(r).get("run")),
            "gpus": as_int(as_map(r).get("gpus")),
            "message": as_str(as_map(r).get("message")),
        }
        for r in as_list(forecast.get("remedies"))
    ]
    confidence = as_str(forecast.get("confidence"))
    slice_ = as_map(spec.get("intendedSlice"))
    reported = status.get("countdownSeconds")
    return {
        "name": run_label((namespace_of(resv) or "", name_of(resv))),
        "state": state,
        "reason": as_str(status.get("reason")),
        "message": as_str(status.get("message")),
        "earliestStart": iso(eta),
        "eta": relative(eta, now),
        "countdownSeconds": None if eta is None else max(0, int((eta - now).total_seconds())),
        "reportedCountdownSeconds": as_int(reported) if reported is not None else None,
        "confidence": confidence,
        "restsOn": CONFIDENCE_MEANING.get(confidence or ""),
        "deficitGPUs": as_int(forecast.get("deficitGPUs")),
        "scope": dict(as_map(forecast.get("scope"))) or None,
        "scopeText": scope_text(as_map(forecast.get("scope"))),
        "remedies": remedies,
        "lotteryLikely": any(r["action"] == "Lottery" for r in remedies),
        "conflictSet": conflict,
        "payingEnvelope": as_str(spec.get("payingEnvelope")),
        "slice": {
            "domain": domain_text(as_map(slice_.get("domain"))),
            "nodes": [n for n in as_list(slice_.get("nodes")) if isinstance(n, str)],
        },
        "activatedAt": as_str(status.get("activatedAt")),
        "forecastWritten": bool(forecast),
    }


def excluded_record(run: Obj, nodes: Iterable[Obj], pods: Iterable[Obj]) -> list[Record]:
    """Per domain of the Run's flavor and location: how many nodes take none of its ranks and
    why (``shared.engine.exclusions``), from the Nodes and the bound, non-terminal Pods."""
    try:
        request = run_request(run)
    except TranslateError:
        return []
    records: list[NodeRecord] = []
    for obj in nodes:
        try:
            record = node_record(obj)
        except TranslateError:
            continue
        if isinstance(record, NodeRecord):
            records.append(record)
    uses: list[PodChange] = []
    for pod in pods:
        used = pod_usage(dict(pod))
        if used is not None:
            uses.append((object_key(pod), used[0], used[1]))
    topology = Topology.build(records, (), uses)
    return [
        {
            "domain": "/".join(domain),
            "nodes": total,
            "excluded": sum(reasons.values()),
            "reasons": dict(reasons),
        }
        for domain, (total, reasons) in excluded_nodes(request, topology).items()
    ]


def plan_record(
    run: Obj, reservation: Obj | None, now: datetime, excluded: list[Record] | None = None
) -> Record:
    """``kubectl runs plan``: phase and typed reason; the forecast when Reserved; width and
    funding when Running; the nodes its ranks cannot use, per domain (``excluded_record``)."""
    status = as_map(run.get("status"))
    phase = as_str(status.get("phase"))
    record: Record = {
        "run": run_label(run_key_of(run)),
        "owner": as_str(as_map(run.get("spec")).get("owner")),
        "phase": phase or "Pending",
        "reason": run_reason(run),
        "message": as_str(status.get("message")),
        "request": request_summary(run),
        "earliestStart": as_str(status.get("earliestStart")),
        "conditions": conditions(run),
        "atRisk": at_risk(run),
        "reservation": None if reservation is None else reservation_record(reservation, now),
        "excludedNodes": excluded or [],
    }
    if phase in ("Running", *TERMINAL_PHASES) or status.get("width"):
        record["width"] = width_record(run)
        record["funding"] = funding_record(run)
    record["hint"] = plan_hint(record)
    return record


def plan_hint(record: Mapping[str, Any]) -> str | None:
    """One line of what to do or expect next."""
    phase, resv = record.get("phase"), as_map(record.get("reservation"))
    if not record.get("conditions") and not record.get("message") and phase == "Pending":
        return "no status yet: the Run has not been admitted (is jobtree-admission running?)"
    if phase == "Reserved" and not resv:
        return "Reserved but its Reservation was not found (canceled or not yet created)"
    if resv and resv.get("state") in ("Pending", "Active") and not resv.get("forecastWritten"):
        return "no forecast yet on the Reservation (is jobtree-forecast running?)"
    if resv and resv.get("lotteryLikely"):
        return "activation will likely need a lottery: see the conflict set and kill probabilities"
    if phase == "Pending" and record.get("reason"):
        return "blocked by " + str(record["reason"]) + ": check budgets with `budgets usage`"
    return None


# ---------------------------------------------------------------------------- leases and pods


def lease_row(lease: Obj, now: datetime) -> Record:
    """One Lease: who, where, how many, who pays, why it opened and how it closed."""
    spec, status = as_map(lease.get("spec")), as_map(lease.get("status"))
    labels = as_map(as_map(lease.get("metadata")).get("labels"))
    slice_ = as_map(spec.get("slice"))
    group, rank = comp_position([p for p in as_list(spec.get("compPath")) if isinstance(p, str)])
    start = parse_ts(as_map(spec.get("interval")).get("start"))
    closed = status.get("closed") is True
    end = parse_ts(status.get("endTime")) if closed else None
    budget, envelope = as_str(spec.get("paidByBudget")), as_str(spec.get("paidByEnvelope"))
    payer = as_str(spec.get("paidByOwner"))
    kind = as_str(labels.get(LABEL_FUNDING)) or (
        "owned" if payer and payer == spec.get("owner") else "family" if payer else None
    )
    return {
        "name": name_of(lease),
        "run": run_label(lease_run_key(lease)),
        "group": group,
        "rank": rank,
        "role": as_str(slice_.get("role")),
        "gpus": as_int(slice_.get("gpus")),
        "nodes": [n for n in as_list(slice_.get("nodes")) if isinstance(n, str)],
        "payer": {
            "owner": payer,
            "budget": budget,
            "envelope": envelope,
            "kind": kind,
        },
        "reason": as_str(spec.get("reason")),
        "start": iso(start),
        "closed": closed,
        "end": iso(end),
        "closure": as_str(status.get("closureReason")) if closed else None,
        "state": ("closed: " + str(status.get("closureReason") or "?")) if closed else "open",
        "held": human_duration(((end or now) - start).total_seconds()) if start else "-",
        "started": relative(start, now),
    }


def lease_rows(leases: Iterable[Obj], now: datetime) -> list[Record]:
    """Leases oldest first (open and historical)."""
    return [lease_row(lease, now) for lease in sorted(leases, key=_lease_order)]


def pod_row(pod: Obj, now: datetime) -> Record:
    meta, spec, status = (as_map(pod.get(k)) for k in ("metadata", "spec", "status"))
    labels = as_map(meta.get("labels"))
    gpus = 0
    for container in as_list(spec.get("containers")):
        limits = as_map(as_map(as_map(container).get("resources")).get("limits"))
        for resource, value in limits.items():
            if resource.endswith("/gpu") and str(value).isdigit():
                gpus += int(str(value))
    ready = sum(
        1 for c in as_list(status.get("containerStatuses")) if as_map(c).get("ready") is True
    )
    phase = as_str(status.get("phase")) or "Pending"
    if meta.get("deletionTimestamp"):
        phase = "Terminating"
    return {
        "name": name_of(pod),
        "group": as_str(labels.get(LABEL_GROUP)),
        "rank": as_str(labels.get(LABEL_RANK)),
        "role": as_str(labels.get("rq.davidlangworthy.io/role")),
        "node": as_str(spec.get("nodeName")),
        "gpus": gpus,
        "phase": phase,
        "ready": f"{ready}/{len(as_list(spec.get('containers')))}",
        "age": age(pod, now),
    }


def pod_rows(pods: Iterable[Obj], now: datetime) -> list[Record]:
    def order(pod: Obj) -> tuple[int, int, str]:
        labels = as_map(as_map(pod.get("metadata")).get("labels"))
        group, rank = str(labels.get(LABEL_GROUP, "")), str(labels.get(LABEL_RANK, ""))
        return (
            int(group) if group.isdigit() else 1 << 30,
            int(rank) if rank.isdigit() else 1 << 30,
            name_of(pod),
        )

    return [pod_row(pod, now) for pod in sorted(pods, key=order)]


# ---------------------------------------------------------------------------- budgets usage


def _records(objects: Iterable[Obj], convert: Any, what: str, skipped: list[str]) -> list[Any]:
    out = []
    for obj in objects:
        try:
            out.append(convert(obj))
        except TranslateError as exc:
            skipped.append(f"{what} {name_of(obj)}: {exc}")
    return out


def _status_envelope(budget: Obj, name: str) -> Mapping[str, Any] | None:
    for env in as_list(as_map(budget.get("status")).get("envelopes")):
        if as_map(env).get("name") == name:
            return as_map(env)
    return None


def _status_cap(budget: Obj, name: str) -> Mapping[str, Any] | None:
    for cap in as_list(as_map(budget.get("status")).get("aggregateCaps")):
        if as_map(cap).get("name") == name:
            return as_map(cap)
    return None


def _hours(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _window(start: datetime | None, end: datetime | None, now: datetime) -> str:
    if end is not None and now >= end:
        return "closed"
    if start is not None and now < start:
        return f"opens {relative(start, now)}"
    if end is not None:
        return f"ends {relative(end, now)}"
    return "open"


def usage_record(
    budgets: Iterable[Obj],
    leases: Iterable[Obj],
    now: datetime,
    *,
    owner: str | None = None,
    spare_factor: float = 1.0,
) -> Record:
    """``kubectl runs budgets usage``: headroom per envelope and aggregate cap.

    Figures are recomputed from the live Leases with the engine's accounting (the same replay
    Budget status is derived from), so they are right even before the admission service has
    written any status; the status figures, when present, are shown beside them with whether
    they agree.
    """
    skipped: list[str] = []
    budget_objs = sorted(budgets, key=name_of)
    lease_objs = list(leases)
    records: list[BudgetRecord] = _records(budget_objs, budget_record, "Budget", skipped)
    ledger: list[LeaseRecord] = _records(lease_objs, lease_record, "Lease", skipped)
    caps = [cap for budget in records for cap in budget.caps]
    usage = usage_from_ledger(ledger, caps, now=now, spare_factor=spare_factor)
    family = Family(records)
    by_name = {name_of(obj): obj for obj in budget_objs}
    envelopes: list[Record] = []
    cap_rows: list[Record] = []
    for budget in records:
        if not owner_matches(budget.owner, owner, family):
            continue
        obj = by_name[budget.name]
        updated = as_str(as_map(obj.get("status")).get("updatedAt"))
        for env in budget.envelopes:
            room = headroom(env, usage, now)
            used = usage.envelope(env.key)
            reported = _status_envelope(obj, env.name)
            reported_room = as_map(as_map(reported).get("headroom"))
            row: Record = {
                "budget": budget.name,
                "owner": budget.owner,
                "envelope": env.name,
                "flavor": env.flavor,
                "selector": dict(env.selector),
                "window": _window(env.start, env.end, now),
                "active": room.window_open and not (env.end is not None and now >= env.end),
                "concurrency": env.concurrency,
                "usedGPUs": used.total.gpus,
                "headroomGPUs": room.concurrency_gpus,
                "maxGPUHours": env.max_gpu_hours,
                "usedGPUHours": _hours(used.total.gpu_hours),
                "headroomGPUHours": _hours(room.gpu_hours),
                "owned": used.owned.gpus,
                "shared": used.shared.gpus,
                "borrowedOut": used.borrowed_out.gpus,
                "spare": used.spare.gpus,
                "lending": None
                if not env.lending.allow
                else {
                    "to": list(env.lending.to),
                    "maxConcurrency": env.lending.max_concurrency,
                    "lentGPUs": used.lent.gpus,
                },
                "status": None
                if reported is None
                else {
                    "headroomGPUs": as_int(reported_room.get("concurrency"))
                    if reported_room.get("concurrency") is not None
                    else None,
                    "updatedAt": updated,
                    "agrees": as_int(reported_room.get("concurrency"), -1) == room.concurrency_gpus,
                },
            }
            envelopes.append(row)
        for cap in budget.caps:
            room = cap_headroom(cap, usage)
            used_cap = usage.cap(cap.key)
            reported = _status_cap(obj, cap.name)
            reported_room = as_map(as_map(reported).get("headroom"))
            cap_rows.append(
                {
                    "budget": budget.name,
                    "owner": budget.owner,
                    "cap": cap.name,
                    "flavor": cap.flavor,
                    "envelopes": [e.rpartition("/")[2] for e in cap.envelopes],
                    "maxConcurrency": cap.max_concurrency,
                    "usedGPUs": used_cap.gpus,
                    "headroomGPUs": room.concurrency_gpus,
                    "maxGPUHours": cap.max_gpu_hours,
                    "usedGPUHours": _hours(used_cap.gpu_hours),
                    "headroomGPUHours": _hours(room.gpu_hours),
                    "status": None
                    if reported is None
                    else {
                        "headroomGPUs": reported_room.get("concurrency"),
                        "updatedAt": updated,
                    },
                }
            )
    with_status = sum(1 for obj in budget_objs if as_map(obj.get("status")).get("envelopes"))
    return {
        "owner": owner,
        "at": iso(now),
        "source": (
            f"live: recomputed from {len(ledger)} Leases with the engine's accounting"
            f" (spare factor {spare_factor:g})"
        ),
        "budgetStatus": (
            f"{with_status} of {len(budget_objs)} Budgets carry a status"
            if with_status
            else "no Budget status written yet (figures are the live recomputation only)"
        ),
        "envelopes": envelopes,
        "aggregateCaps": cap_rows,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------- explain


def _draw_row(draw: Mapping[str, Any]) -> Record:
    group = draw.get("group")
    return {
        "step": as_int(draw.get("step")),
        "owner": as_str(draw.get("owner")),
        "run": as_str(draw.get("run")),
        "group": as_int(group) if group is not None else None,
        "gpus": as_int(draw.get("gpus")),
    }


def _token(entry: Mapping[str, Any]) -> lottery.Token:
    run = as_str(entry.get("run")) or ""
    namespace, sep, name = run.partition("/")
    owner = as_str(entry.get("owner"))
    if not sep or not owner or not isinstance(entry.get("gpus"), int):
        raise ViewError(f"token {dict(entry)!r} lacks owner, run or gpus")
    group, width, slack = entry.get("group"), entry.get("width"), entry.get("runSlack")
    return lottery.Token(
        owner=owner,
        run=(namespace, name),
        group=as_int(group) if group is not None else None,
        gpus=as_int(entry.get("gpus")),
        lease_names=tuple(str(n) for n in as_list(entry.get("leases"))),
        width=as_int(width) if width is not None else None,
        run_slack=as_int(slack) if slack is not None else None,
    )


def replay_audit(audit: Mapping[str, Any]) -> Record:
    """Replay a published lottery from its seed, tokens and deficit; compare with the record.

    The draws are recomputed by ``shared.engine.lottery.replay`` — the very function the resolver
    drew them with — and the verdict is ``verified`` when every recorded draw (step, owner, run,
    group, GPUs) is reproduced exactly, ``MISMATCH`` otherwise. Without a seed no lottery ran
    (``no lottery``); without tokens nothing can be replayed (``unverifiable``).
    """
    seed = as_str(audit.get("seed"))
    recorded = [_draw_row(as_map(d)) for d in as_list(audit.get("draws"))]
    deficit = as_int(audit.get("deficitGPUs"))
    out: Record = {
        "seed": seed,
        "deficitGPUs": deficit,
        "recorded": recorded,
        "replayed": [],
        "tokens": len(as_list(audit.get("tokens"))),
    }
    if seed is None:
        out["verdict"] = "MISMATCH" if recorded else "no lottery"
        out["detail"] = (
            "draws recorded without a seed" if recorded else "structural cuts cleared the deficit"
        )
        return out
    try:
        tokens = [_token(as_map(t)) for t in as_list(audit.get("tokens"))]
    except ViewError as exc:
        out.update(verdict="unverifiable", detail=str(exc))
        return out
    if not tokens and recorded:
        out.update(verdict="unverifiable", detail="the audit records draws but no tokens")
        return out
    replayed = [
        {
            "step": d.step,
            "owner": d.owner,
            "run": run_label(d.token.run),
            "group": d.token.group,
            "gpus": d.token.gpus,
        }
        for d in lottery.replay(seed, tokens, deficit)
    ]
    out["replayed"] = replayed
    if replayed == recorded:
        out.update(verdict="verified", detail=f"{len(replayed)} draws reproduced from the seed")
        return out
    first = next(
        (i for i, (a, b) in enumerate(zip(recorded, replayed, strict=False)) if a != b),
        min(len(recorded), len(replayed)),
    )
    out.update(
        verdict="MISMATCH",
        detail=f"recorded and replayed draws differ from step {first} "
        f"({len(recorded)} recorded, {len(replayed)} replayed)",
    )
    return out


def _node_domain(nodes: Mapping[str, Obj], name: str) -> str | None:
    node = nodes.get(name)
    if node is None:
        return None
    labels = as_map(as_map(node.get("metadata")).get("labels"))
    if not all(k in labels for k in DOMAIN_LABELS):
        return None
    return domain_text(labels)


def placement(rows: Sequence[Mapping[str, Any]], nodes: Mapping[str, Obj]) -> list[Record]:
    """Per group: domain(s), nodes, GPUs by role (open leases; all when none is open)."""
    live = [r for r in rows if not r["closed"]] or list(rows)
    groups: dict[int, Record] = {}
    for row in live:
        entry = groups.setdefault(
            row["group"],
            {"group": row["group"], "domains": [], "nodes": [], "gpus": 0, "spareGPUs": 0},
        )
        for node in row["nodes"]:
            if node not in entry["nodes"]:
                entry["nodes"].append(node)
            domain = _node_domain(nodes, node) or "unknown"
            if domain not in entry["domains"]:
                entry["domains"].append(domain)
        key = "spareGPUs" if row["role"] == "Spare" else "gpus"
        entry[key] += row["gpus"]
    out = [groups[g] for g in sorted(groups)]
    for entry in out:
        entry["domain"] = ", ".join(entry["domains"])
        entry["historical"] = not any(not r["closed"] for r in rows)
    return out


def funding_by_payer(rows: Sequence[Mapping[str, Any]]) -> list[Record]:
    """GPUs of open leases (and lease counts) per paying envelope."""
    payers: dict[tuple[str, str, str], Record] = {}
    for row in rows:
        payer = row["payer"]
        key = (
            str(payer.get("owner") or "?"),
            f"{payer.get('budget') or '?'}/{payer.get('envelope') or '?'}",
            str(payer.get("kind") or "?"),
        )
        entry = payers.setdefault(
            key,
            {"owner": key[0], "envelope": key[1], "kind": key[2], "openGPUs": 0, "leases": 0},
        )
        entry["leases"] += 1
        if not row["closed"]:
            entry["openGPUs"] += row["gpus"]
    return [payers[k] for k in sorted(payers)]


def _audit_touches(
    audit: Mapping[str, Any], label: str, lease_names: set[str], seeds: set[str]
) -> list[str]:
    """Why an audit concerns the Run (empty when it does not)."""
    why = []
    if label in as_list(audit.get("conflictSet")):
        why.append("in the conflict set")
    if any(as_map(t).get("run") == label for t in as_list(audit.get("tokens"))):
        why.append("held tokens")
    if any(as_map(d).get("run") == label for d in as_list(audit.get("draws"))):
        why.append("drawn")
    if lease_names & {str(n) for n in as_list(audit.get("endedLeases"))}:
        why.append("leases ended")
    if as_str(audit.get("seed")) in seeds:
        why.append("leases closed RandomPreempt(seed)")
    return why


def explain_record(
    run: Obj,
    leases: Iterable[Obj],
    reservations: Iterable[Obj],
    nodes: Iterable[Obj],
    now: datetime,
    *,
    spare_factor: float = 1.0,
) -> Record:
    """``kubectl runs explain``: who pays, where it runs, every lease, and every lottery that
    touched the Run, replayed from its seed."""
    key = run_key_of(run)
    label = run_label(key)
    mine = leases_of(key, leases)
    rows = lease_rows(mine, now)
    node_map = {name_of(n): n for n in nodes}
    skipped: list[str] = []
    records: list[LeaseRecord] = _records(mine, lease_record, "Lease", skipped)
    summary = run_funding(records, now=now, spare_factor=spare_factor).as_status()
    names = {name_of(lease) for lease in mine}
    seeds = {s for r in rows if (s := closure_seed(r["closure"]))}
    lotteries: list[Record] = []
    found_seeds: set[str] = set()
    for resv in sorted(reservations, key=lambda r: (namespace_of(r) or "", name_of(r))):
        status = as_map(resv.get("status"))
        audit = as_map(status.get("audit"))
        if not audit:
            continue
        why = _audit_touches(audit, label, names, seeds)
        if not why:
            continue
        seed = as_str(audit.get("seed"))
        if seed:
            found_seeds.add(seed)
        replay = replay_audit(audit)
        ended = [str(n) for n in as_list(audit.get("endedLeases")) if str(n) in names]
        lotteries.append(
            {
                "reservation": run_label((namespace_of(resv) or "", name_of(resv))),
                "reservedFor": run_label(reservation_run_key(resv)),
                "state": as_str(status.get("state")),
                "activatedAt": as_str(status.get("activatedAt")),
                "touches": why,
                "scope": dict(as_map(audit.get("scope"))) or None,
                "scopeText": scope_text(as_map(audit.get("scope"))),
                "seed": seed,
                "deficitGPUs": replay["deficitGPUs"],
                "conflictSet": [str(r) for r in as_list(audit.get("conflictSet"))],
                "tokens": replay["tokens"],
                "draws": replay["recorded"],
                "replayed": replay["replayed"],
                "drawsOnThisRun": [d for d in replay["recorded"] if d["run"] == label],
                "endedLeasesOfThisRun": ended,
                "verdict": replay["verdict"],
                "detail": replay["detail"],
            }
        )
    owner = as_str(as_map(run.get("spec")).get("owner"))
    if owner is None and mine:
        owner = as_str(as_map(mine[0].get("spec")).get("owner"))
    return {
        "run": label,
        "owner": owner,
        "phase": as_str(as_map(run.get("status")).get("phase"))
        or ("Pending" if run.get("spec") else None),
        "request": request_summary(run) if run.get("spec") else None,
        "funding": {
            "summary": summary,
            "byPayer": funding_by_payer(rows),
        },
        "placement": placement(rows, node_map),
        "leases": rows,
        "lotteries": lotteries,
        "unmatchedSeeds": sorted(seeds - found_seeds),
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------- edits


def sponsors_of(run: Obj) -> list[str]:
    funding = as_map(as_map(run.get("spec")).get("funding"))
    return [s for s in as_list(funding.get("sponsors")) if isinstance(s, str)]


def sponsors_record(run: Obj) -> Record:
    """``kubectl runs sponsors list``: the named sponsors and what each pays now."""
    funding = as_map(as_map(run.get("spec")).get("funding"))
    paying = {
        as_str(as_map(s).get("owner")): as_map(s)
        for s in as_list(as_map(as_map(run.get("status")).get("funding")).get("sponsors"))
    }
    rows = []
    for owner in sponsors_of(run):
        now_paying = paying.get(owner, {})
        rows.append(
            {
                "owner": owner,
                "kind": as_str(now_paying.get("kind")),
                "gpus": as_int(now_paying.get("gpus")),
                "gpuHours": float(now_paying.get("gpuHours") or 0.0),
            }
        )
    return {
        "run": run_label(run_key_of(run)),
        "allowBorrow": bool(funding.get("allowBorrow")),
        "maxBorrowGPUs": as_int(funding.get("maxBorrowGPUs"))
        if funding.get("maxBorrowGPUs") is not None
        else None,
        "sponsors": rows,
    }


@dataclass(frozen=True, slots=True)
class Edit:
    """A validated spec change: the merge patch to send, or nothing when already so."""

    patch: Record | None
    message: str
    notes: tuple[str, ...] = ()


def _checked(run: Obj, spec_change: Mapping[str, Any]) -> None:
    """Validate the Run as it would be after the change, with the API models."""
    spec = {k: v for k, v in as_map(run.get("spec")).items()}
    for key, value in spec_change.items():
        merged = dict(as_map(spec.get(key)))
        for inner, inner_value in as_map(value).items():
            if inner_value is None:
                merged.pop(inner, None)
            else:
                merged[inner] = inner_value
        spec[key] = merged
    manifest = {
        "apiVersion": run.get("apiVersion") or "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name_of(run), "namespace": namespace_of(run)},
        "spec": spec,
    }
    try:
        Run.parse(manifest)
    except ApiValidationError as exc:
        raise ViewError("; ".join(exc.issues)) from exc


def _guarded(run: Obj, spec_change: Record) -> Record:
    """Merge patch with the resourceVersion read: a concurrent change fails with a conflict."""
    version = as_str(as_map(run.get("metadata")).get("resourceVersion"))
    meta = {"resourceVersion": version} if version else {}
    return {"metadata": meta, "spec": spec_change}


def sponsors_edit(run: Obj, action: str, owner: str) -> Edit:
    """Add or remove one sponsor owner in ``spec.funding.sponsors``."""
    label = run_label(run_key_of(run))
    if not _OWNER.match(owner) or len(owner) > 253:
        raise ViewError(f"invalid owner {owner!r}: colon-separated [a-z0-9-] segments")
    current = sponsors_of(run)
    if action == "add":
        if owner in current:
            return Edit(None, f"run {label}: {owner} is already a sponsor (unchanged)")
        wanted: list[str] | None = [*current, owner]
    elif action == "remove":
        if owner not in current:
            shown = ", ".join(current) or "none"
            raise ViewError(f"run {label}: {owner} is not a sponsor (sponsors: {shown})")
        wanted = [s for s in current if s != owner] or None
    else:
        raise ViewError(f"unknown sponsors action {action!r}")
    change = {"funding": {"sponsors": wanted}}
    _checked(run, change)
    funding = as_map(as_map(run.get("spec")).get("funding"))
    notes: list[str] = []
    if action == "add" and not funding.get("allowBorrow"):
        notes.append(
            "note: spec.funding.allowBorrow is false, so sponsors are not used until it is true"
        )
    verb = "added" if action == "add" else "removed"
    return Edit(
        _guarded(run, change),
        f"run {label}: sponsor {owner} {verb} (sponsors: {', '.join(wanted or []) or 'none'})",
        tuple(notes),
    )


def shrink_edit(run: Obj, *, by: int | None = None, to: int | None = None) -> Edit:
    """Lower ``spec.malleable.desiredTotalGPUs`` by or to a width on the step grid."""
    label = run_label(run_key_of(run))
    malleable = as_map(as_map(run.get("spec")).get("malleable"))
    if not malleable:
        raise ViewError(f"run {label} is not malleable (no spec.malleable): it cannot shrink")
    low, high = as_int(malleable.get("minTotalGPUs")), as_int(malleable.get("maxTotalGPUs"))
    step = as_int(malleable.get("stepGPUs"))
    current = desired_width(run)
    if (by is None) == (to is None):
        raise ViewError("give exactly one of --by N or --to N")
    if by is not None and by <= 0:
        raise ViewError(f"--by must be a positive number of GPUs, not {by}")
    target = current - by if by is not None else int(to or 0)
    grid = list(range(low, current + 1, step)) if step > 0 else [low]
    if target > current:
        raise ViewError(
            f"run {label}: {target} GPUs is above the current desired width {current}: "
            "shrink only lowers it"
        )
    if target < low:
        raise ViewError(
            f"run {label}: {target} GPUs is below malleable.minTotalGPUs {low} "
            f"(widths: {', '.join(map(str, grid))})"
        )
    if step > 0 and (target - low) % step:
        raise ViewError(
            f"run {label}: {target} GPUs is off the step grid {low} + n × {step} "
            f"(widths: {', '.join(map(str, grid))})"
        )
    if target == current:
        return Edit(None, f"run {label}: desired width already {current} GPUs (unchanged)")
    change = {"malleable": {"desiredTotalGPUs": target}}
    _checked(run, change)
    return Edit(
        _guarded(run, change),
        f"run {label}: desired width {current} → {target} GPUs (bounds {low}–{high}, "
        f"step {step}); Jobtree releases borrowed groups first, highest index first",
    )


# ---------------------------------------------------------------------------- watch


def is_terminal(run: Obj | None) -> bool:
    return run is not None and as_map(run.get("status")).get("phase") in TERMINAL_PHASES


def _event(now: datetime, obj: str, name: str, message: str, **extra: Any) -> Record:
    return {"time": iso(now), "object": obj, "name": name, "message": message, **extra}


def run_events(run: Obj, old: Obj | None, now: datetime, *, deleted: bool = False) -> list[Record]:
    """Lines for a Run change: phase (with its reason), width, funding, risk."""
    label = run_label(run_key_of(run))
    if deleted:
        return [_event(now, "run", label, "deleted", deleted=True)]
    out: list[Record] = []
    new_status, old_status = as_map(run.get("status")), as_map((old or {}).get("status"))
    phase = new_status.get("phase") or "Pending"
    old_phase = old_status.get("phase") or "Pending"
    if old is None or phase != old_phase:
        text = f"phase {old_phase} → {phase}" if old is not None else f"phase {phase}"
        reason, message = run_reason(run), as_str(new_status.get("message"))
        if message:
            text += f": {message}"
        elif reason:
            text += f" ({reason})"
        out.append(_event(now, "run", label, text, phase=phase))
    width, old_width = width_record(run), width_record(old or {})
    if new_status.get("width") and (old is None or width != old_width):
        out.append(_event(now, "run", label, "width " + width_text(width), width=width))
    funding, old_funding = funding_record(run), funding_record(old or {})
    if new_status.get("funding") and (old is None or funding != old_funding):
        out.append(_event(now, "run", label, "funding " + funding_text(funding), funding=funding))
    risk, old_risk = at_risk(run), at_risk(old or {})
    if risk != old_risk:
        text = f"at risk: {risk['message']}" if risk else "no longer at risk"
        out.append(_event(now, "run", label, text))
    return out


def _expected_start(resv: Obj) -> datetime | None:
    return parse_ts(as_map(as_map(resv.get("status")).get("forecast")).get("expectedStart"))


def reservation_events(
    resv: Obj, old: Obj | None, now: datetime, *, deleted: bool = False
) -> list[Record]:
    """Lines for a Reservation change: state, ETA and countdown, deficit, lottery seed."""
    label = run_label((namespace_of(resv) or "", name_of(resv)))
    if deleted:
        return [_event(now, "reservation", label, "deleted")]
    new = reservation_record(resv, now)
    before = None if old is None else reservation_record(old, now)
    watched = ("state", "earliestStart", "reportedCountdownSeconds", "deficitGPUs", "confidence")
    expected = _expected_start(resv)
    if (
        before is not None
        and all(new[k] == before[k] for k in watched)
        and expected == _expected_start(old or {})
    ):
        seed = as_str(as_map(as_map(resv.get("status")).get("audit")).get("seed"))
        old_seed = as_str(as_map(as_map((old or {}).get("status")).get("audit")).get("seed"))
        if seed and seed != old_seed:
            return [_event(now, "reservation", label, f"lottery seed published: {seed}")]
        return []
    countdown = new["reportedCountdownSeconds"]
    if countdown is None:
        countdown = new["countdownSeconds"]
    text = f"{new['state']}, starts {new['earliestStart']} ({new['eta']}"
    text += f", countdown {human_duration(countdown)})" if countdown is not None else ")"
    if new["deficitGPUs"]:
        text += f", deficit {new['deficitGPUs']} GPUs"
    if new["confidence"]:
        text += f", {new['confidence']}"
    if expected is not None:
        text += f", expected {relative(expected, now)}"
    return [
        _event(
            now,
            "reservation",
            label,
            text,
            state=new["state"],
            countdownSeconds=countdown,
            earliestStart=new["earliestStart"],
        )
    ]


def lease_events(
    lease: Obj, old: Obj | None, now: datetime, *, deleted: bool = False
) -> list[Record]:
    """Lines for a Lease: opened, closed (with the closure reason)."""
    row = lease_row(lease, now)
    where = ",".join(row["nodes"])
    payer = row["payer"]
    if deleted:
        return [_event(now, "lease", row["name"], "deleted from the ledger")]
    was_closed = old is not None and lease_row(old, now)["closed"]
    if row["closed"] and not was_closed:
        text = f"closed {row['closure']} after {row['held']} ({row['gpus']} GPUs on {where})"
        return [_event(now, "lease", row["name"], text, closed=True, closure=row["closure"])]
    if old is None and not row["closed"]:
        text = (
            f"opened {row['gpus']} GPUs on {where} ({row['role']}, {row['reason']}, "
            f"paid by {payer['owner']} {payer['budget']}/{payer['envelope']}, {payer['kind']})"
        )
        return [_event(now, "lease", row["name"], text, closed=False)]
    return []


def watch_snapshot(
    run: Obj, reservations: Iterable[Obj], leases: Iterable[Obj], now: datetime
) -> list[Record]:
    """The first lines of a watch: the Run's state, its Reservation and a lease summary."""
    out = run_events(run, None, now)
    resv = pick_reservation(run, reservations)
    if resv is not None:
        out += reservation_events(resv, None, now)
    rows = lease_rows(leases_of(run_key_of(run), leases), now)
    open_rows = [r for r in rows if not r["closed"]]
    gpus = sum(r["gpus"] for r in open_rows)
    out.append(
        _event(
            now,
            "lease",
            "(all)",
            f"{len(open_rows)} open ({gpus} GPUs), {len(rows) - len(open_rows)} closed",
        )
    )
    return out
