"""Flow 3 — a capacity shortfall becomes a Reservation with a computed ETA; at the ETA activation
binds it, cutting what it must (SPEC §3 Reservations and forecast; Activation and resolver).

Four owners (one Budget each, 128 GPUs of fabric domain nv-b) share nv-b, 16 nodes of 8 GPUs.

* **Walltime ETA.** ``wall`` (64 GPUs, ``maxDuration: 30s``), ``spared`` (16 GPUs + one 8-GPU
  spare per group) and ``elastic`` (malleable 8..32) fill nv-b. ``waiting`` (64 GPUs) cannot
  start: its Reservation's ``earliestStart`` is exactly when ``wall``'s leases reach their
  walltime (confidence ``walltime``), the intended slice is ``wall``'s nodes, and the forecast
  block publishes the deficit, the remedies (drop spares, shrink, lottery), the conflict set and
  kill odds, which mark the Runs at risk ``AtRisk``. At the ETA ``wall`` ends ``TimeLimit`` and
  ``waiting`` binds on its slice: Released, nothing cut, no lottery.
* **Lottery.** Nothing in nv-b has a walltime, so the ETA is the configured conservative lead
  (set to 30 s for this module by restarting the forecaster). At the ETA the resolver drops the
  spares (``DropSpare``), shrinks ``elastic`` to its minimum (``Shrink``) and draws the seeded
  lottery for the rest (``RandomPreempt(<seed>)``); the reserved Run binds. Seed, conflict set,
  tokens and draws are in ``status.audit`` and on one resolver log line, the seed is
  SHA-256(scope, reservation uid, activatedAt), and ``shared.engine.lottery.verify`` replays the
  draw from the audit alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from services.local.stack import LocalStack
from shared.engine.lottery import Draw, Token, lottery_seed, replay, verify

from .conftest import RESERVATIONS, describe_leases, eventually, get_json, run_pods
from .helpers import (
    NV_B,
    all_run_leases,
    apply_yaml,
    budget_manifest,
    closure,
    condition,
    envelope,
    is_open,
    log_lines,
    parse_time,
    run_manifest,
    run_status,
    setup_namespace,
    teardown,
    wait_running,
)

NS = "e2e-reservation"
OWNERS = {
    "spare": "e2e:resv:spare",
    "elastic": "e2e:resv:elastic",
    "fixed": "e2e:resv:fixed",
    "big": "e2e:resv:big",
}
BUDGETS = tuple(f"e2e-resv-{key}" for key in OWNERS)
SCOPE = "H100-80GB@us-west/gpu-b/nv-b"
NV_B_NODES = [f"gpu-b-{i:02d}" for i in range(1, 17)]
LEAD_SECONDS = 30
"""The forecaster's conservative lead for this module (the default, 24 h, is no test)."""
FORECAST_ENV = {
    "JOBTREE_CONSERVATIVE_LEAD_HOURS": f"{LEAD_SECONDS / 3600:.6f}",
    "JOBTREE_FORECAST_TICK_SECONDS": "1",
}


@pytest.fixture(scope="module")
def short_lead(stack: LocalStack) -> Iterator[LocalStack]:
    """The stack with the forecaster restarted on a 30 s conservative lead and a 1 s timer;
    restarted on the stack's own settings afterwards."""
    services = stack.services
    saved = dict(services.extra_env)

    def restart(env: dict[str, str]) -> None:
        services.extra_env.clear()
        services.extra_env.update(env)
        try:
            services.restart("forecast")
        finally:
            services.extra_env.clear()
            services.extra_env.update(saved)
        services.wait_ready(60, names=["forecast"])

    restart({**saved, **FORECAST_ENV})
    try:
        yield stack
    finally:
        restart(saved)


def _budgets() -> list[dict[str, Any]]:
    return [
        budget_manifest(name, owner, [envelope("nv-b", NV_B, 128)])
        for name, owner in zip(BUDGETS, OWNERS.values(), strict=True)
    ]


def _run(name: str, owner: str, gpus: int, **spec: Any) -> dict[str, Any]:
    return run_manifest(name, NS, OWNERS[owner], gpus, group_gpus=8, selector=NV_B, **spec)


def _plan_file(stack: LocalStack, manifest: dict[str, Any]) -> dict[str, Any]:
    """``kubectl runs plan -f`` (the plugin's entry point) on a Run manifest, as JSON."""
    path = stack.workdir / f"what-if-{manifest['metadata']['name']}.json"
    path.write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, "-m", "services.kubectl_runs", "plan", "-f", str(path), "-o", "json"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    record: dict[str, Any] = json.loads(done.stdout)
    return record


def _start_in_order(stack: LocalStack, *runs: dict[str, Any]) -> None:
    """Apply each Run and wait until it holds its width and its spares (one at a time: a
    deterministic fill)."""
    for manifest in runs:
        apply_yaml(stack, manifest)
        name, spec = manifest["metadata"]["name"], manifest["spec"]
        gpus = spec["resources"]["totalGPUs"]
        spares = spec.get("sparesPerGroup", 0) * -(-gpus // spec["locality"]["groupGPUs"])

        def started(name: str = name, gpus: int = gpus, spares: int = spares) -> None:
            status = run_status(stack, NS, name)
            assert status.get("phase") == "Running", f"{name}: {status}"
            assert (status.get("width") or {}).get("allocated") == gpus, f"{name}: {status}"
            live = [x for x in all_run_leases(stack, NS, name) if is_open(x)]
            held = {"Active": 0, "Spare": 0}
            for lease in live:
                held[_role(lease)] = held.get(_role(lease), 0) + lease["spec"]["slice"]["gpus"]
            assert held == {"Active": gpus, "Spare": spares}, (
                f"{name} leases:\n{describe_leases(live)}"
            )

        eventually(started, timeout=45)


def _reservation_of(stack: LocalStack, run: str) -> dict[str, Any]:
    """The Run's one Reservation (made by the forecaster), once its status is published."""

    def check() -> dict[str, Any]:
        items: list[dict[str, Any]] = [
            r
            for r in get_json(stack, "-n", NS, RESERVATIONS)["items"]
            if r["spec"]["runRef"]["name"] == run
        ]
        assert len(items) == 1, f"Reservations of {run}: {[r['metadata']['name'] for r in items]}"
        status = items[0].get("status") or {}
        assert status.get("state") == "Pending" and status.get("forecast"), (
            f"Reservation {items[0]['metadata']['name']} status: {json.dumps(status, indent=1)}"
        )
        return items[0]

    result: dict[str, Any] = eventually(check, timeout=30)
    return result


def _released(stack: LocalStack, name: str, timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        obj: dict[str, Any] = get_json(stack, "-n", NS, RESERVATIONS, name)
        status = obj.get("status") or {}
        assert status.get("state") == "Released", (
            f"Reservation {name} not Released: {json.dumps(status, indent=1)}"
        )
        return obj

    result: dict[str, Any] = eventually(check, timeout=timeout)
    return result


def _remedies(status: dict[str, Any]) -> dict[tuple[str, str | None], int]:
    return {
        (r["action"], r.get("run")): int(r["gpus"])
        for r in (status.get("forecast") or {}).get("remedies") or []
    }


def _at_risk(stack: LocalStack, run: str) -> dict[str, Any] | None:
    return condition(run_status(stack, NS, run), "AtRisk")


def _nodes(leases: list[dict[str, Any]]) -> list[str]:
    return sorted(n for x in leases for n in x["spec"]["slice"]["nodes"])


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if not head or line.startswith("#"):
            continue
        metric, _, rest = head.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p)) if rest else ""
        if metric == name and got == want:
            return float(value)
    return 0.0


# ---------------------------------------------------------------------------- walltime ETA


def test_walltime_eta_reservation_binds_when_the_walltime_ends(
    clean: LocalStack, short_lead: LocalStack
) -> None:
    stack = short_lead
    setup_namespace(stack, NS, "e2e:resv:*")
    try:
        apply_yaml(stack, *_budgets())
        _start_in_order(
            stack,
            _run("spared", "spare", 16, sparesPerGroup=8),
            _run(
                "elastic",
                "elastic",
                32,
                malleable={"minTotalGPUs": 8, "maxTotalGPUs": 32, "stepGPUs": 8},
            ),
            _run("wall", "fixed", 64, runtime={"maxDuration": "30s"}),
        )
        wall_leases = [x for x in all_run_leases(stack, NS, "wall") if is_open(x)]
        wall_nodes = _nodes(wall_leases)
        starts = {parse_time(x["spec"]["interval"]["start"]) for x in wall_leases}
        assert len(starts) == 1, describe_leases(wall_leases)
        walltime_end = starts.pop() + timedelta(seconds=30)
        held = sorted(
            n for r in ("spared", "elastic", "wall") for n in _nodes(all_run_leases(stack, NS, r))
        )
        assert held == NV_B_NODES, f"nv-b is not full: {held}"

        # --- before submitting: the what-if (`kubectl runs plan -f`) promises the same ETA ----
        what_if = _plan_file(stack, _run("waiting", "big", 64))
        assert what_if["startsNow"] is False, what_if
        assert parse_time(what_if["earliestStart"]) == walltime_end, what_if
        assert what_if["confidence"] == "walltime", what_if
        assert sorted(what_if["slice"]) == wall_nodes, what_if
        assert {r["run"] for r in what_if["atRisk"]} == {f"{NS}/spared", f"{NS}/wall"}, what_if
        assert stack.kubectl_json("get", RESERVATIONS, "-n", NS)["items"] == []  # nothing written

        apply_yaml(stack, _run("waiting", "big", 64))
        resv = _reservation_of(stack, "waiting")
        name = resv["metadata"]["name"]
        spec, status = resv["spec"], resv["status"]

        # --- the promise: a computed ETA, the slice that frees then, what activating now cuts ---
        assert parse_time(spec["earliestStart"]) == walltime_end, (
            f"earliestStart {spec['earliestStart']} is not wall's lease start + maxDuration "
            f"({walltime_end.isoformat()})"
        )
        assert status["forecast"]["confidence"] == "walltime", status
        assert sorted(spec["intendedSlice"]["nodes"]) == wall_nodes, spec
        assert spec["payingEnvelope"] == "e2e-resv-big/nv-b", spec
        assert "Capacity" in status["reason"], status
        assert 0 < status["countdownSeconds"] <= 30, status
        forecast = status["forecast"]
        assert forecast["deficitGPUs"] == 64, forecast
        assert forecast["scope"] == {"kind": "Location", "flavor": "H100-80GB", "selector": NV_B}
        assert _remedies(status) == {
            ("DropSpare", f"{NS}/spared"): 16,
            ("Shrink", f"{NS}/elastic"): 24,
            ("Lottery", None): 24,
        }, forecast["remedies"]
        assert forecast["conflictSet"] == [f"{NS}/spared", f"{NS}/wall"], forecast
        assert forecast["killProbability"] == {f"{NS}/spared": 0.5, f"{NS}/wall": 1}, forecast
        # The expected start, learnt from the ledger, never later than the guarantee.
        expected = [parse_time(forecast[k]) for k in ("expectedStartP10", "expectedStart")]
        expected.append(parse_time(forecast["expectedStartP90"]))
        assert expected == sorted(expected) and expected[-1] <= walltime_end, forecast
        assert "completed Runs" in forecast["expectedBasis"], forecast
        waiting = run_status(stack, NS, "waiting")
        assert waiting.get("phase") == "Reserved", waiting
        assert waiting.get("pendingReservation") == name, waiting
        assert parse_time(waiting.get("earliestStart")) == walltime_end, waiting

        def marked() -> None:
            for run, odds in (("spared", "0.50"), ("wall", "1.00")):
                cond = _at_risk(stack, run)
                assert cond is not None and cond["status"] == "True", f"{run} AtRisk: {cond}"
                assert cond["reason"] == "ReservationConflict", cond
                assert f"kill probability {odds}" in cond["message"], cond
                assert f"{NS}/{name}" in cond["message"], cond
            cond = _at_risk(stack, "elastic")
            assert cond is None or cond["status"] == "False", f"elastic only shrinks: {cond}"

        eventually(marked, timeout=15)

        def counting_down() -> None:
            now = get_json(stack, "-n", NS, RESERVATIONS, name)["status"]["countdownSeconds"]
            assert now < status["countdownSeconds"], f"countdown stuck at {now}"

        eventually(counting_down, timeout=10)

        # --- at the ETA: wall ends by its walltime; waiting binds on the freed slice -----------
        released = _released(stack, name, timeout=60)["status"]
        # At the ETA two paths may bind the Run on the freed slice: the resolver's activation
        # (Bound), or admission retrying the Reserved Run the moment wall's leases close, just
        # before the activation finds it running (AlreadyRunning). Either way: no cuts.
        assert released["reason"] in ("Bound", "AlreadyRunning"), released
        assert not (released.get("audit") or {}).get("seed"), f"a lottery ran: {released}"
        assert parse_time(released["activatedAt"]) >= walltime_end - timedelta(seconds=1)
        ended = all_run_leases(stack, NS, "wall")
        assert {closure(x) for x in ended} == {"TimeLimit"}, describe_leases(ended)
        wait_running(stack, NS, "waiting", 64, timeout=30)
        bound = [x for x in all_run_leases(stack, NS, "waiting") if is_open(x)]
        assert _nodes(bound) == wall_nodes, describe_leases(bound)
        assert {x["spec"]["reason"] for x in bound} == {"Start"}, describe_leases(bound)
        for run in ("spared", "elastic"):
            leases = all_run_leases(stack, NS, run)
            assert all(is_open(x) for x in leases), f"{run} lost leases:\n{describe_leases(leases)}"

        def cleared() -> None:
            cond = _at_risk(stack, "spared")
            assert cond is not None and cond["status"] == "False", f"spared AtRisk: {cond}"
            assert cond["reason"] == "NoConflict", cond

        eventually(cleared, timeout=15)
    finally:
        teardown(stack, NS, BUDGETS)


# ---------------------------------------------------------------------------- lottery


def test_activation_drops_spares_shrinks_then_draws_the_lottery(
    clean: LocalStack, short_lead: LocalStack
) -> None:
    stack = short_lead
    setup_namespace(stack, NS, "e2e:resv:*")
    resolver_before = stack.services.metrics("resolver")
    try:
        apply_yaml(stack, *_budgets())
        _start_in_order(
            stack,
            _run("spared", "spare", 16, sparesPerGroup=8),
            _run(
                "elastic",
                "elastic",
                48,
                malleable={"minTotalGPUs": 16, "maxTotalGPUs": 48, "stepGPUs": 8},
            ),
            _run("fixed-a", "fixed", 24),
            _run("fixed-b", "elastic", 24),
        )
        runs = ("spared", "elastic", "fixed-a", "fixed-b")
        before = {run: [x for x in all_run_leases(stack, NS, run) if is_open(x)] for run in runs}
        held = sorted(n for leases in before.values() for n in _nodes(leases))
        assert held == NV_B_NODES, f"nv-b is not full: {held}"

        apply_yaml(stack, _run("big", "big", 64))
        resv = _reservation_of(stack, "big")
        name, uid = resv["metadata"]["name"], resv["metadata"]["uid"]
        status = resv["status"]
        created = parse_time(resv["metadata"]["creationTimestamp"])
        eta = parse_time(resv["spec"]["earliestStart"])

        # --- nothing bounds the wait: the conservative lead; what activation will cut ----------
        assert status["forecast"]["confidence"] == "conservative", status
        lead = (eta - created).total_seconds()
        assert LEAD_SECONDS - 2 <= lead <= LEAD_SECONDS + 2, f"ETA {eta} created {created}"
        assert sorted(resv["spec"]["intendedSlice"]["nodes"]) == NV_B_NODES, resv["spec"]
        assert status["forecast"]["deficitGPUs"] == 64, status
        assert _remedies(status) == {
            ("DropSpare", f"{NS}/spared"): 16,
            ("Shrink", f"{NS}/elastic"): 32,
            ("Lottery", None): 16,
        }, status["forecast"]["remedies"]
        conflict = [f"{NS}/fixed-a", f"{NS}/fixed-b", f"{NS}/spared"]
        assert status["forecast"]["conflictSet"] == conflict, status
        assert status["forecast"]["killProbability"] == dict.fromkeys(conflict, 0.3333), status

        def marked() -> None:
            for run in ("fixed-a", "fixed-b", "spared"):
                cond = _at_risk(stack, run)
                assert cond is not None and cond["status"] == "True", f"{run} AtRisk: {cond}"
                assert "kill probability 0.33" in cond["message"], cond

        eventually(marked, timeout=15)

        # --- at the ETA: DropSpare, Shrink, RandomPreempt(<seed>), then the bind ---------------
        obj = _released(stack, name, timeout=LEAD_SECONDS + 30)
        released = obj["status"]
        assert released["reason"] == "Resolved", released
        activated = parse_time(released["activatedAt"])
        assert activated >= eta - timedelta(seconds=1), released
        audit = released["audit"]
        seed = audit["seed"]
        assert seed == lottery_seed(SCOPE, uid, activated), (
            f"seed is not SHA-256(scope, uid, activatedAt): {audit}"
        )
        assert audit["scope"] == {"kind": "Location", "flavor": "H100-80GB", "selector": NV_B}
        assert audit["conflictSet"] == conflict, audit
        assert audit["deficitGPUs"] == 16, audit
        assert len(audit["draws"]) == 1, audit
        drawn = audit["draws"][0]["run"].split("/")[1]
        assert drawn in ("fixed-a", "fixed-b", "spared"), audit

        # The ledger: each cut closed with its reason; nothing else touched.
        now = {x["metadata"]["name"]: x for run in runs for x in all_run_leases(stack, NS, run)}
        closures = {
            run: {x["metadata"]["name"]: closure(now[x["metadata"]["name"]]) for x in leases}
            for run, leases in before.items()
        }
        detail = json.dumps(closures, indent=1)
        spares = {x["metadata"]["name"] for x in before["spared"] if _role(x) == "Spare"}
        assert len(spares) == 2, detail
        assert {closures["spared"][n] for n in spares} == {"DropSpare"}, detail
        shrunk = [n for n, c in closures["elastic"].items() if c == "Shrink"]
        assert len(shrunk) == 4, f"elastic should shrink 48 -> 16 (4 groups): {detail}"
        assert sum(c is None for c in closures["elastic"].values()) == 2, detail
        preempt = f"RandomPreempt({seed})"
        for run in ("fixed-a", "fixed-b", "spared"):
            working = {closures[run][n] for n in closures[run] if n not in spares}
            assert working == {preempt if run == drawn else None}, detail
        ended = {n for leases in closures.values() for n, c in leases.items() if c is not None}
        assert set(audit["endedLeases"]) == ended, audit

        # The reserved Run holds 64 GPUs on nv-b; the drawn Run (no checkpoint) failed with it.
        wait_running(stack, NS, "big", 64, timeout=30)
        bound = [x for x in all_run_leases(stack, NS, "big") if is_open(x)]
        assert set(_nodes(bound)) <= set(NV_B_NODES) and len(_nodes(bound)) == 8
        assert {x["spec"]["reason"] for x in bound} == {"Start"}, describe_leases(bound)

        def drawn_failed() -> None:
            cut = run_status(stack, NS, drawn)
            assert cut.get("phase") == "Failed", f"{drawn}: {cut}"
            assert preempt in (cut.get("message") or ""), cut
            assert not [p for p in run_pods(stack, NS, drawn) if is_live(p)], "pods remain"

        eventually(drawn_failed, timeout=30)

        # --- the one grep-able line, and the replay from the published audit alone ----------
        lines = log_lines(stack, "resolver", f"RandomPreempt({seed})")
        assert len(lines) == 1, f"resolver lines with RandomPreempt({seed}): {lines}"
        line = json.loads(lines[0])
        assert f"reservation={NS}/{name}" in line["msg"], line
        assert line["seed"] == seed and line["conflictSet"] == conflict, line
        assert re.search(rf"draws=\[0:{NS}/{drawn}\]", line["msg"]), line

        tokens = [_token(t) for t in audit["tokens"]]
        recorded = [_draw(d, tokens, seed) for d in audit["draws"]]
        assert verify(seed, tokens, audit["deficitGPUs"], recorded), (
            f"the published draws do not replay from the seed: {audit}"
        )
        assert [d.token.run[1] for d in replay(seed, tokens, audit["deficitGPUs"])] == [drawn]
        forged = [_draw({**audit["draws"][0], "run": _other(audit, drawn)}, tokens, seed)]
        assert not verify(seed, tokens, audit["deficitGPUs"], forged)

        after = stack.services.metrics("resolver")
        for kind in ("DropSpare", "Shrink", "RandomPreempt"):
            delta = _metric(after, "jobtree_resolver_actions_total", kind=kind) - _metric(
                resolver_before, "jobtree_resolver_actions_total", kind=kind
            )
            assert delta >= 1, f"jobtree_resolver_actions_total{{kind={kind}}} did not move"
        draws = _metric(after, "jobtree_lottery_draws_total") - _metric(
            resolver_before, "jobtree_lottery_draws_total"
        )
        assert draws == 1, f"jobtree_lottery_draws_total moved by {draws}"

        def cleared() -> None:
            for run in {"fixed-a", "fixed-b", "spared"} - {drawn}:
                cond = _at_risk(stack, run)
                assert cond is not None and cond["status"] == "False", f"{run} AtRisk: {cond}"

        eventually(cleared, timeout=15)
    finally:
        teardown(stack, NS, BUDGETS)


# ---------------------------------------------------------------------------- helpers


def _role(lease: dict[str, Any]) -> str:
    return str(lease["spec"]["slice"]["role"])


def is_live(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp")


def _run_key(label: str) -> tuple[str, str]:
    namespace, _, name = label.partition("/")
    return namespace, name


def _token(entry: dict[str, Any]) -> Token:
    return Token(
        owner=entry["owner"],
        run=_run_key(entry["run"]),
        group=entry.get("group"),
        gpus=int(entry["gpus"]),
        lease_names=tuple(entry.get("leases") or ()),
        width=entry.get("width"),
        run_slack=entry.get("runSlack"),
    )


def _draw(entry: dict[str, Any], tokens: list[Token], seed: str) -> Draw:
    run, group = _run_key(entry["run"]), entry.get("group")
    token = next(t for t in tokens if t.run == run and t.group == group)
    return Draw(step=int(entry["step"]), owner=token.owner, token=token, seed=seed)


def _other(audit: dict[str, Any], drawn: str) -> str:
    return next(str(t["run"]) for t in audit["tokens"] if t["run"].split("/")[1] != drawn)
