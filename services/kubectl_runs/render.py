"""Printing records: aligned tables that fit the terminal, or JSON / YAML documents (pure).

Every command prints the record its view built (``shared.cli.views``): ``-o json|yaml`` dumps
it as is, ``-o table`` (the default) lays it out for a person. Tables shrink their widest
columns (cells end in ``…``) until they fit ``width``, never below 80 columns in practice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from shared.cli.expected import expected_text
from shared.cli.views import funding_text, human_duration, request_text, width_text

FORMATS = ("table", "json", "yaml")
MIN_CELL = 6


def cell(value: Any) -> str:
    """One table cell: ``-`` for nothing, compact numbers, lists joined by commas."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) < 1e6 else f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def short_closure(text: Any) -> Any:
    """``RandomPreempt(<64 hex>)`` → ``RandomPreempt(4d6106f7fc62…)`` for tables (the full seed
    is in the lottery section and in ``-o json``)."""
    if isinstance(text, str) and len(text) > 30 and "RandomPreempt(" in text:
        head, _, seed = text.partition("RandomPreempt(")
        return f"{head}RandomPreempt({seed[:12]}…)"
    return text


def _fit(text: str, size: int) -> str:
    return text if len(text) <= size else text[: max(1, size - 1)] + "…"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, width: int = 120, indent: int = 0
) -> str:
    """Aligned columns that fit ``width``.

    Columns are two spaces apart (one when two would not fit); then the widest
    columns shrink first, cells ending in ``…``, and the first column — the row's name — only
    when nothing else can give.
    """
    cells = [[cell(v) for v in row] for row in rows]
    sizes = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    floor = [min(sizes[i], max(MIN_CELL, len(h))) for i, h in enumerate(headers)]
    gap = 2 if sum(sizes) + 2 * (len(headers) - 1) <= width - indent else 1
    budget = width - indent - gap * (len(headers) - 1)
    while sum(sizes) > budget:
        shrinkable = [i for i in range(1, len(sizes)) if sizes[i] > floor[i]]
        if not shrinkable:
            shrinkable = [0] if sizes[0] > floor[0] else []
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: sizes[i])
        sizes[widest] -= 1
    pad, sep = " " * indent, " " * gap
    lines = []
    for row in [list(headers), *cells]:
        parts = [_fit(text, sizes[i]).ljust(sizes[i]) for i, text in enumerate(row)]
        lines.append((pad + sep.join(parts)).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Any]], *, width: int = 120) -> str:
    """``Key:  value`` lines, keys aligned; long values wrap under their value column."""
    shown = [(k, cell(v)) for k, v in pairs if v is not None and v != ""]
    if not shown:
        return ""
    key_size = max(len(k) for k, _ in shown) + 2
    room = max(20, width - key_size)
    lines = []
    for key, value in shown:
        chunks = _wrap(value, room)
        lines.append(f"{key + ':':<{key_size}}{chunks[0]}")
        lines += [" " * key_size + chunk for chunk in chunks[1:]]
    return "\n".join(lines)


def _wrap(text: str, size: int) -> list[str]:
    words, lines, line = text.split(" "), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > size:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return lines


def dump(data: Any, fmt: str) -> str:
    """``json`` (indented, key order kept) or ``yaml`` (block style, key order kept)."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100).rstrip()


def _section(title: str, body: str) -> str:
    return f"\n{title}\n{body}" if body else ""


# ---------------------------------------------------------------------------- commands


def plan(record: Mapping[str, Any], width: int = 120) -> str:
    """``kubectl runs plan``."""
    out = [
        fields(
            [
                ("Run", f"{record['run']} (owner {record.get('owner') or '?'})"),
                ("Request", request_text(record.get("request") or {})),
                ("Phase", record.get("phase")),
                ("Reason", record.get("reason")),
                ("Message", record.get("message")),
                ("At risk", (record.get("atRisk") or {}).get("message")),
            ],
            width=width,
        )
    ]
    if "width" in record:
        out.append(
            fields(
                [
                    ("Width", width_text(record["width"])),
                    ("Funding", funding_text(record["funding"])),
                ],
                width=width,
            )
        )
    resv = record.get("reservation")
    if resv:
        eta = f"{resv.get('earliestStart')} ({resv.get('eta')})"
        reported = resv.get("reportedCountdownSeconds")
        if reported is not None:
            eta += f"; forecaster's countdown {human_duration(reported)}"
        confidence = resv.get("confidence")
        rests = f"{confidence}: {resv.get('restsOn')}" if confidence else "not forecast yet"
        slice_ = resv.get("slice") or {}
        out.append(
            _section(
                "Reservation",
                fields(
                    [
                        ("Name", f"{resv['name']} ({resv.get('state')})"),
                        ("Reason", resv.get("reason")),
                        ("Message", resv.get("message")),
                        ("ETA", eta),
                        ("Expected", expected_text(resv.get("expected"), resv["earliestStart"])),
                        ("Rests on", rests),
                        ("Waits on", resv.get("openClaims") or None),
                        (
                            "Deficit",
                            f"{resv.get('deficitGPUs', 0)} GPUs in {resv.get('scopeText')}",
                        ),
                        ("Paying", resv.get("payingEnvelope")),
                        ("Slice", f"{slice_.get('domain')} {cell(slice_.get('nodes'))}"),
                        ("Activated", resv.get("activatedAt")),
                    ],
                    width=width,
                ),
            )
        )
        remedies = resv.get("remedies") or []
        if remedies:
            rows = [
                [i + 1, r.get("action"), r.get("run"), r.get("gpus"), r.get("message")]
                for i, r in enumerate(remedies)
            ]
            out.append(
                _section(
                    "Remedies at activation (in order):",
                    table(["STEP", "ACTION", "RUN", "GPUS", "DETAIL"], rows, width=width, indent=2),
                )
            )
        conflict = resv.get("conflictSet") or []
        if conflict:
            rows = [
                [c["run"], "-" if c["killProbability"] is None else f"{c['killProbability']:.2f}"]
                for c in conflict
            ]
            out.append(
                _section(
                    "Conflict set (runs a lottery could cut, with kill probability):",
                    table(["RUN", "KILL-P"], rows, width=width, indent=2),
                )
            )
    excluded = record.get("excludedNodes") or []
    if excluded:
        rows = [
            [
                e["domain"],
                f"{e['excluded']} of {e['nodes']}",
                ", ".join(f"{why} {count}" for why, count in e["reasons"].items()),
            ]
            for e in excluded
        ]
        out.append(
            _section(
                "Excluded nodes (take none of its ranks), per domain:",
                table(["DOMAIN", "NODES", "WHY"], rows, width=width, indent=2),
            )
        )
    conds = record.get("conditions") or []
    if conds:
        rows = [[c["type"], c["status"], c.get("reason"), c.get("message")] for c in conds]
        out.append(
            _section(
                "Conditions:",
                table(["TYPE", "STATUS", "REASON", "MESSAGE"], rows, width=width, indent=2),
            )
        )
    if record.get("hint"):
        out.append(f"\nHint: {record['hint']}")
    return "\n".join(part for part in out if part)


def leases(rows: Sequence[Mapping[str, Any]], width: int = 120) -> str:
    """``kubectl runs leases``."""
    if not rows:
        return "No leases found."
    body = [
        [
            r["name"],
            r.get("group"),
            r.get("role"),
            r.get("gpus"),
            r.get("nodes"),
            f"{r['payer'].get('budget')}/{r['payer'].get('envelope')}",
            r["payer"].get("kind"),
            r.get("reason"),
            short_closure(r.get("state")),
            r.get("held"),
        ]
        for r in rows
    ]
    headers = ["NAME", "GROUP", "ROLE", "GPUS", "NODE", "ENVELOPE", "FUNDING", "REASON", "STATE"]
    return table([*headers, "HELD"], body, width=width)


def pods(rows: Sequence[Mapping[str, Any]], width: int = 120) -> str:
    """``kubectl runs pods``."""
    if not rows:
        return "No pods found."
    body = [
        [
            r["name"],
            r.get("group"),
            r.get("rank"),
            r.get("role"),
            r.get("node"),
            r.get("gpus"),
            r.get("ready"),
            r.get("phase"),
            r.get("age"),
        ]
        for r in rows
    ]
    headers = ["NAME", "GROUP", "RANK", "ROLE", "NODE", "GPUS", "READY", "PHASE", "AGE"]
    return table(headers, body, width=width)


def hours(value: Any) -> str:
    """GPU-hours: whole numbers without decimals, ``∞`` for no bound."""
    if value is None:
        return "∞"
    number = float(value)
    return f"{number:.0f}" if number.is_integer() else f"{number:.1f}"


def _ratio(used: Any, limit: Any, fmt: Any = cell) -> str:
    return f"{fmt(used)}/{'∞' if limit is None else fmt(limit)}"


def _status_line(envelopes: Sequence[Mapping[str, Any]]) -> str | None:
    """How the Budget status compares with the live recomputation."""
    reported = [e for e in envelopes if e.get("status") is not None]
    if not reported:
        return None
    differs = [e for e in reported if not e["status"].get("agrees")]
    updated = reported[0]["status"].get("updatedAt") or "?"
    if not differs:
        return f"Budget status (updated {updated}) agrees with the live figures"
    shown = ", ".join(
        f"{e['envelope']} status says {e['status'].get('headroomGPUs')} free" for e in differs
    )
    return f"Budget status (updated {updated}) differs: {shown} (live figures shown above)"


def usage(record: Mapping[str, Any], width: int = 120) -> str:
    """``kubectl runs budgets usage``: one table per owner's Budget, then aggregate caps.

    GPUS is used/concurrency now, FREE the concurrency headroom; GPU-H is used/max GPU-hours
    and GPU-H FREE what is left; OWNED/SHARED/LENT/SPARE split the GPUs in use.
    """
    out = [
        fields(
            [
                ("Owner", record.get("owner") or "all"),
                ("At", record.get("at")),
                ("Source", record.get("source")),
                ("Status", record.get("budgetStatus")),
            ],
            width=width,
        )
    ]
    envelopes = record.get("envelopes") or []
    if not envelopes:
        out.append("\nNo budgets match.")
    owners: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for env in envelopes:
        owners.setdefault((env["owner"], env["budget"]), []).append(env)
    for (owner, budget), rows in owners.items():
        flavors = sorted({str(env.get("flavor")) for env in rows})
        uniform = len(flavors) == 1
        headers = ["ENVELOPE", *([] if uniform else ["FLAVOR"]), "WINDOW", "GPUS", "FREE"]
        headers += ["GPU-H", "GPU-H FREE", "OWNED", "SHARED", "LENT", "SPARE"]
        body = [
            [
                env["envelope"],
                *([] if uniform else [env.get("flavor")]),
                env.get("window"),
                _ratio(env.get("usedGPUs"), env.get("concurrency")),
                env.get("headroomGPUs"),
                _ratio(env.get("usedGPUHours"), env.get("maxGPUHours"), hours),
                hours(env.get("headroomGPUHours")),
                env.get("owned"),
                env.get("shared"),
                env.get("borrowedOut"),
                env.get("spare"),
            ]
            for env in rows
        ]
        section = table(headers, body, width=width)
        status = _status_line(rows)
        if status:
            section += "\n" + status
        title = f"{owner} (Budget {budget}" + (f", {flavors[0]})" if uniform else ")")
        out.append(_section(title, section))
    caps = record.get("aggregateCaps") or []
    if caps:
        body = [
            [
                f"{c['budget']}/{c['cap']}",
                c.get("flavor"),
                c.get("envelopes"),
                _ratio(c.get("usedGPUs"), c.get("maxConcurrency")),
                "∞" if c.get("headroomGPUs") is None else c["headroomGPUs"],
                _ratio(c.get("usedGPUHours"), c.get("maxGPUHours"), hours),
                hours(c.get("headroomGPUHours")),
            ]
            for c in caps
        ]
        cap_headers = ["AGGREGATE CAP", "FLAVOR", "ENVELOPES", "GPUS", "FREE", "GPU-H"]
        out.append(
            _section(
                "Aggregate caps",
                table([*cap_headers, "GPU-H FREE"], body, width=width),
            )
        )
    for skipped in record.get("skipped") or []:
        out.append(f"warning: skipped {skipped}")
    return "\n".join(part for part in out if part)


def explain(record: Mapping[str, Any], width: int = 120) -> str:
    """``kubectl runs explain``."""
    summary = record["funding"]["summary"]
    out = [
        fields(
            [
                ("Run", f"{record['run']} (owner {record.get('owner') or '?'})"),
                (
                    "Request",
                    request_text(record["request"])
                    if record.get("request")
                    else "unknown: the Run no longer exists (explained from its Leases)",
                ),
                ("Phase", record.get("phase")),
                ("Funding", funding_text(summary)),
                (
                    "GPU-hours",
                    f"{summary['ownedGPUHours']:.2f} owned, {summary['sharedGPUHours']:.2f} "
                    f"shared, {summary['borrowedGPUHours']:.2f} borrowed",
                ),
            ],
            width=width,
        )
    ]
    payers = record["funding"]["byPayer"]
    if payers:
        rows = [[p["owner"], p["kind"], p["envelope"], p["openGPUs"], p["leases"]] for p in payers]
        out.append(
            _section(
                "Funding per payer:",
                table(
                    ["PAYER", "KIND", "ENVELOPE", "OPEN GPUS", "LEASES"],
                    rows,
                    width=width,
                    indent=2,
                ),
            )
        )
    groups = record.get("placement") or []
    if groups:
        title = "Placement per group"
        if groups[0].get("historical"):
            title += " (no open lease: last known)"
        rows = [[g["group"], g["domain"], g["gpus"], g["spareGPUs"], g["nodes"]] for g in groups]
        out.append(
            _section(
                title + ":",
                table(["GROUP", "DOMAIN", "GPUS", "SPARE", "NODES"], rows, width=width, indent=2),
            )
        )
    rows_ = record.get("leases") or []
    if rows_:
        body = [
            [
                r["name"],
                r.get("role"),
                r.get("gpus"),
                r.get("nodes"),
                r["payer"].get("owner"),
                r.get("reason"),
                r.get("started"),
                r.get("held"),
                short_closure(r.get("closure")) or "open",
            ]
            for r in rows_
        ]
        headers = ["LEASE", "ROLE", "GPUS", "NODE", "PAYER", "REASON", "STARTED", "HELD"]
        out.append(_section("Leases:", table([*headers, "CLOSURE"], body, width=width, indent=2)))
    else:
        out.append("\nLeases: none")
    lotteries = record.get("lotteries") or []
    if not lotteries:
        out.append("\nLotteries: none touched this run")
    for lot in lotteries:
        out.append(
            _section(
                f"Lottery of reservation {lot['reservation']} (for {lot['reservedFor']}):",
                fields(
                    [
                        ("  Touched this run", ", ".join(lot["touches"])),
                        ("  Activated", lot.get("activatedAt")),
                        ("  Scope", lot.get("scopeText")),
                        ("  Seed", lot.get("seed") or "none (no lottery ran)"),
                        ("  Deficit", f"{lot.get('deficitGPUs')} GPUs after structural cuts"),
                        ("  Conflict set", ", ".join(lot.get("conflictSet") or []) or "-"),
                        ("  Tokens", lot.get("tokens")),
                        ("  Ended leases", ", ".join(lot.get("endedLeasesOfThisRun") or [])),
                        ("  Replay", f"{lot['verdict']} ({lot.get('detail')})"),
                    ],
                    width=width,
                ),
            )
        )
        draws = lot.get("draws") or []
        replayed = lot.get("replayed") or []
        if draws or replayed:
            body = []
            for i in range(max(len(draws), len(replayed))):
                rec = draws[i] if i < len(draws) else None
                rep = replayed[i] if i < len(replayed) else None
                shown = rec or {}
                mark = " *" if shown.get("run") == record["run"] else ""
                check = "ok" if rec is not None and rec == rep else "replay: " + _draw_text(rep)
                body.append(
                    [
                        i if rec is None else rec.get("step"),
                        shown.get("owner"),
                        f"{shown.get('run') or '-'}{mark}",
                        shown.get("group"),
                        shown.get("gpus"),
                        check,
                    ]
                )
            headers = ["STEP", "OWNER", "RUN (* = this run)", "GROUP", "GPUS", "REPLAY CHECK"]
            out.append("\n" + table(headers, body, width=width, indent=2))
    for seed in record.get("unmatchedSeeds") or []:
        out.append(
            f"\nwarning: leases closed RandomPreempt({seed}) but no Reservation audit with that "
            "seed is visible: cannot replay it"
        )
    for skipped in record.get("skipped") or []:
        out.append(f"warning: skipped {skipped}")
    return "\n".join(part for part in out if part)


def _draw_text(draw: Mapping[str, Any] | None) -> str:
    if draw is None:
        return "-"
    group = "" if draw.get("group") is None else f" group {draw['group']}"
    return f"{draw.get('owner')} {draw.get('run')}{group} {draw.get('gpus')} GPUs"


def event(record: Mapping[str, Any]) -> str:
    """One watch line: ``HH:MM:SS  object  name  message``."""
    time = str(record.get("time") or "")[11:19]
    return f"{time}  {record['object']:<11}  {record['name']}  {record['message']}"


def submitted(results: Sequence[Mapping[str, Any]]) -> str:
    """``kubectl runs submit``: kubectl's ``kind/name result`` lines."""
    return "\n".join(f"{r['resource']}/{r['name']} {r['result']}" for r in results)
