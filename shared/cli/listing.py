"""``kubectl runs list``: one row per Run, from the Run, its Reservation and its Leases (pure).

A row says what ``squeue`` would: who (owner), what state (phase and the typed reason behind
it), how wide (allocated of desired GPUs), when (ETA: the Reservation's ``earliestStart``, else
the Run's ``status.earliestStart``) and how old. ``-o wide`` adds who pays and where it runs
(the fabric domains of its open Leases' nodes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from shared.cli import views
from shared.engine.family import Family

Obj = Mapping[str, Any]
Record = dict[str, Any]
SORTS = ("name", "eta", "age", "gpus")


def run_width(run: Obj) -> Record:
    """Allocated and wanted GPUs: the status width, else the request (nothing allocated)."""
    width = views.width_record(run)
    request = views.request_summary(run)
    wanted = width["desired"] or (
        request["malleable"]["desired"] if "malleable" in request else request["totalGPUs"]
    )
    return {"allocated": width["allocated"], "desired": wanted, "pending": width["pending"]}


def list_row(
    run: Obj,
    reservation: Obj | None,
    open_leases: Sequence[Obj],
    nodes: Mapping[str, Obj],
    now: datetime,
) -> Record:
    """The record of one Run: the columns of ``list`` and ``list -o wide``, for ``-o json``."""
    status = views.as_map(run.get("status"))
    resv = None if reservation is None else views.reservation_record(reservation, now)
    start = resv["earliestStart"] if resv and resv["earliestStart"] else None
    start = start or views.iso(views.parse_ts(status.get("earliestStart")))
    phase = views.as_str(status.get("phase")) or "Pending"
    waiting = phase not in ("Running", *views.TERMINAL_PHASES)
    eta_at = views.parse_ts(start) if waiting else None
    created = views.parse_ts(views.as_map(run.get("metadata")).get("creationTimestamp"))
    rows = views.lease_rows(open_leases, now)
    domains = sorted({d for g in views.placement(rows, nodes) for d in g["domains"]})
    return {
        "name": views.name_of(run),
        "namespace": views.namespace_of(run),
        "owner": views.as_str(views.as_map(run.get("spec")).get("owner")),
        "phase": phase,
        "reason": views.run_reason(run),
        "width": run_width(run),
        "earliestStart": views.iso(eta_at),
        "eta": views.relative(eta_at, now) if eta_at else None,
        "reservation": None if resv is None else resv["name"],
        "created": views.iso(created),
        "age": views.age(run, now),
        "funding": views.funding_record(run),
        "domains": domains,
    }


def width_cell(width: Mapping[str, Any]) -> str:
    """``64/128``: allocated of desired GPUs."""
    return f"{width.get('allocated', 0)}/{width.get('desired', 0)}"


def funding_cell(funding: Mapping[str, Any]) -> str:
    """``96 owned, 32 borrowed`` (only the non-zero parts; ``-`` when nothing is paid)."""
    parts = [
        f"{funding.get(f'{k}GPUs')} {k}"
        for k in ("owned", "shared", "borrowed")
        if funding.get(f"{k}GPUs")
    ]
    return ", ".join(parts) or "-"


NO_FAMILY = Family(())
"""The empty budget tree: an owner query matches only itself or its glob."""


def matches(row: Mapping[str, Any], owner: str | None, phases: Sequence[str] | None) -> bool:
    """``--owner`` (exact or glob: ``list`` reads no Budgets, so no family tree) and ``--phase``
    (any of, case-insensitive)."""
    if owner and not views.owner_matches(str(row.get("owner") or ""), owner, NO_FAMILY):
        return False
    wanted = {p.lower() for p in phases or ()}
    return not wanted or str(row.get("phase")).lower() in wanted


def sort_rows(rows: Iterable[Record], by: str) -> list[Record]:
    """``--sort``: name (namespace, name); eta soonest first, Runs without one last; age oldest
    first; gpus widest (desired) first. Ties keep namespace/name order."""
    if by not in SORTS:
        raise views.ViewError(f"--sort {by!r}: one of {', '.join(SORTS)}")
    ordered = sorted(rows, key=lambda r: (r.get("namespace") or "", r["name"]))
    if by == "eta":
        ordered.sort(key=lambda r: (r["earliestStart"] is None, r["earliestStart"] or ""))
    elif by == "age":
        ordered.sort(key=lambda r: r.get("created") or "")
    elif by == "gpus":
        ordered.sort(key=lambda r: -int(r["width"]["desired"]))
    return ordered


def list_rows(
    runs: Iterable[Obj],
    reservations: Iterable[Obj],
    leases: Iterable[Obj],
    nodes: Iterable[Obj],
    now: datetime,
) -> list[Record]:
    """Rows of every Run (unsorted, unfiltered), joined with its Reservation and open Leases."""
    reservations = list(reservations)
    by_run: dict[tuple[str, str], list[Obj]] = {}
    for lease in leases:
        if not views.as_map(lease.get("status")).get("closed"):
            by_run.setdefault(views.lease_run_key(lease), []).append(lease)
    by_name = {views.name_of(n): n for n in nodes}
    return [
        list_row(
            run,
            views.pick_reservation(run, reservations),
            by_run.get(views.run_key_of(run), []),
            by_name,
            now,
        )
        for run in runs
    ]


def cancel_summary(run: Obj, leases: Iterable[Obj]) -> Record:
    """What cancelling ``run`` ends: its phase and its open Leases (count and GPUs)."""
    key = views.run_key_of(run)
    mine = [
        lease
        for lease in views.leases_of(key, leases)
        if not views.as_map(lease.get("status")).get("closed")
    ]
    gpus = sum(
        views.as_int(views.as_map(views.as_map(x.get("spec")).get("slice")).get("gpus"))
        for x in mine
    )
    phase = views.as_str(views.as_map(run.get("status")).get("phase")) or "Pending"
    return {"run": views.run_label(key), "phase": phase, "openLeases": len(mine), "gpus": gpus}
