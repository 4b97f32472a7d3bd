"""The pure views of `kubectl runs` (shared.cli.views), their rendering and the completions.

Objects are the API's plain dicts: samples from config/samples, Leases built with
shared.kube.translate.lease_manifest, lottery audits with real seeds and draws computed by
shared.engine.lottery.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.kubectl_runs import completion, output, render
from services.kubectl_runs.cli import build_parser
from services.kubectl_runs.config import context_namespace
from shared.cli import views
from shared.engine import lottery
from shared.engine.bindplan import LeaseIntent
from shared.engine.family import Family
from shared.engine.model import FundingKind, LeaseReason, Role
from shared.kube.translate import lease_manifest, rfc3339
from tests.unit.engine.budgets import budget, env

SAMPLES = Path(__file__).resolve().parents[3] / "config" / "samples"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
T0 = NOW - timedelta(hours=2)
RUN = ("team", "run-128-groups")
SCOPE = {
    "kind": "Location",
    "flavor": "H100-80GB",
    "selector": {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"},
}


def sample(path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((SAMPLES / path).read_text())
    return loaded


def budgets() -> list[dict[str, Any]]:
    return [sample("budgets/budget-west-h100.yaml"), sample("budgets/budget-vision-lending.yaml")]


def run_obj(**status: Any) -> dict[str, Any]:
    run = sample("runs/run-128-groups.yaml")
    run["metadata"].update(namespace=RUN[0], resourceVersion="42", uid="u-1")
    if status:
        run["status"] = status
    return run


def lease(
    name: str,
    *,
    run: tuple[str, str] = RUN,
    owner: str = "org:ai:rai:sys",
    node: str = "gpu-a-01",
    gpus: int = 8,
    envelope: str = "west-h100/west-h100-nv-a",
    payer: str = "org:ai:rai:sys",
    funding: FundingKind = FundingKind.OWNED,
    group: int = 0,
    rank: int = 0,
    role: Role = Role.ACTIVE,
    start: datetime = T0,
    closed: str | None = None,
    end: datetime | None = None,
) -> dict[str, Any]:
    intent = LeaseIntent(
        name=name,
        run=run,
        owner=owner,
        node=node,
        gpus=gpus,
        role=role,
        group=group,
        rank=rank,
        envelope=envelope,
        payer_owner=payer,
        funding=funding,
        start=start,
        reason=LeaseReason.START,
        expected_end=None,
        comp_path=(f"GROUP[{group}]", f"RANK[{rank}]"),
    )
    obj = lease_manifest(intent, run_uid="u-1", gen=1)
    if closed is not None:
        obj["status"] = {
            "closed": True,
            "endTime": rfc3339(end or NOW),
            "closureReason": closed,
        }
    return obj


def tokens() -> list[lottery.Token]:
    return [
        lottery.Token("org:ai:rai:nlp", ("team", "victim"), None, 8, ("victim-g0-r0",)),
        lottery.Token(
            "org:ai:rai:sys", RUN, 3, 8, ("run-128-groups-g3-r0",), width=32, run_slack=64
        ),
        lottery.Token("org:ai:rai:cv", ("other", "big"), None, 16, ("big-g0-r0",)),
    ]


def label(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}"


def audit(seed: str, deficit: int, toks: Sequence[lottery.Token]) -> dict[str, Any]:
    """The audit record shape of docs/api.md, drawn by the real lottery."""
    draws = lottery.run_lottery(seed, toks, deficit)

    def token(t: lottery.Token) -> dict[str, Any]:
        out: dict[str, Any] = {"owner": t.owner, "run": label(t.run), "gpus": t.gpus}
        out["leases"] = list(t.lease_names)
        if t.group is not None:
            out["group"] = t.group
        if t.width is not None:
            out["width"] = t.width
        if t.run_slack is not None:
            out["runSlack"] = t.run_slack
        return out

    def draw(d: lottery.Draw) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": d.step,
            "owner": d.owner,
            "run": label(d.token.run),
            "gpus": d.token.gpus,
        }
        if d.token.group is not None:
            out["group"] = d.token.group
        return out

    return {
        "seed": seed,
        "scope": SCOPE,
        "deficitGPUs": deficit,
        "conflictSet": sorted({label(t.run) for t in toks}),
        "tokens": [token(t) for t in toks],
        "draws": [draw(d) for d in draws],
        "endedLeases": [n for d in draws for n in d.token.lease_names],
    }


def seed() -> str:
    return lottery.lottery_seed("H100-80GB@us-west/gpu-a/nv-a", "uid-9", NOW)


def reservation(name: str = "resv-1", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Reservation",
        "metadata": {"name": name, "namespace": RUN[0], "creationTimestamp": rfc3339(T0)},
        "spec": {
            "runRef": {"name": RUN[1]},
            "intendedSlice": {
                "domain": SCOPE["selector"],
                "nodes": ["gpu-a-01", "gpu-a-02"],
            },
            "payingEnvelope": "west-h100/west-h100-nv-a",
            "earliestStart": rfc3339(NOW + timedelta(hours=3, minutes=12)),
        },
        "status": status,
    }


FORECAST = {
    "deficitGPUs": 24,
    "scope": SCOPE,
    "remedies": [
        {"action": "DropSpare", "run": "other/big", "gpus": 8, "message": "drop 8 spare GPUs"},
        {"action": "Shrink", "run": "team/victim", "gpus": 8, "message": "shrink by 8"},
        {"action": "Lottery", "gpus": 8, "message": "draw lots for 8 GPUs"},
    ],
    "conflictSet": ["other/big", "team/victim"],
    "killProbability": {"other/big": 0.5, "team/victim": 0.25},
    "confidence": "walltime",
}


# ---------------------------------------------------------------------------- small helpers


def test_human_durations_and_relative_times() -> None:
    assert views.human_duration(42) == "42s"
    assert views.human_duration(725) == "12m5s"
    assert views.human_duration(3 * 3600 + 12 * 60 + 9) == "3h12m"
    assert views.human_duration(3600) == "1h"
    assert views.human_duration(0) == "0s"
    assert views.relative(NOW + timedelta(minutes=5), NOW) == "in 5m"
    assert views.relative(NOW - timedelta(hours=2), NOW) == "2h ago"
    assert views.relative(NOW, NOW) == "now"


def test_owner_filter_is_exact_family_descendant_or_glob() -> None:
    linked = Family(
        [
            budget("org:ai", env("e", 1)),
            budget("org:ai:rai", env("e", 1)),
            budget("org:ai:rai:sys", env("e", 1)),
            budget("org:aix", env("e", 1)),
        ]
    )
    assert views.owner_matches("org:ai:rai:sys", "org:ai:rai:sys", linked)
    assert views.owner_matches("org:ai:rai:sys", "org:ai", linked)
    assert not views.owner_matches("org:aix", "org:ai", linked)
    assert not views.owner_matches("org:ai", "org:ai:rai", linked)
    # A path prefix without the Budgets in between is not a family; a glob selects by path.
    alone = Family([budget("org:ai", env("e", 1)), budget("org:ai:rai:sys", env("e", 1))])
    assert not views.owner_matches("org:ai:rai:sys", "org:ai", alone)
    assert views.owner_matches("org:ai:rai:sys", "org:ai:*", alone)
    assert views.owner_matches("lab:vision", "lab:*", alone)
    assert views.owner_matches("anything", None, alone)


def test_run_references() -> None:
    assert views.split_run_ref("r", "ns") == ("ns", "r")
    assert views.split_run_ref("a/r", "ns") == ("a", "r")
    with pytest.raises(views.ViewError):
        views.split_run_ref("a/b/c", "ns")


def test_kubeconfig_context_namespace() -> None:
    first = {
        "current-context": "dev",
        "contexts": [{"name": "dev", "context": {"namespace": "research"}}],
    }
    second = {"contexts": [{"name": "prod", "context": {"cluster": "p"}}]}
    assert context_namespace([first, second], None) == "research"
    assert context_namespace([first, second], "prod") is None
    assert context_namespace([second], None) is None


# ---------------------------------------------------------------------------- plan


def test_plan_of_a_reserved_run_shows_the_forecast() -> None:
    run = run_obj(
        phase="Reserved",
        message="InsufficientCapacity: 24 GPUs short in us-west/gpu-a/nv-a",
        pendingReservation="resv-1",
        conditions=[
            {"type": "Scheduled", "status": "False", "reason": "InsufficientCapacity"},
        ],
    )
    resv = reservation(state="Pending", countdownSeconds=11500, forecast=FORECAST)
    other = reservation("resv-0", state="Canceled")
    picked = views.pick_reservation(run, [other, resv])
    assert picked is resv
    record = views.plan_record(run, picked, NOW)
    assert record["phase"] == "Reserved"
    assert record["reason"] == "InsufficientCapacity"
    res = record["reservation"]
    assert res["deficitGPUs"] == 24
    assert res["scopeText"] == "Location H100-80GB us-west/gpu-a/nv-a"
    assert res["countdownSeconds"] == 3 * 3600 + 12 * 60
    assert res["eta"] == "in 3h12m"
    assert res["reportedCountdownSeconds"] == 11500
    assert res["restsOn"] == views.CONFIDENCE_MEANING["walltime"]
    assert [r["action"] for r in res["remedies"]] == ["DropSpare", "Shrink", "Lottery"]
    assert res["lotteryLikely"]
    assert res["conflictSet"] == [
        {"run": "other/big", "killProbability": 0.5},
        {"run": "team/victim", "killProbability": 0.25},
    ]
    assert "width" not in record
    text = render.plan(record, 100)
    for needle in ("InsufficientCapacity", "24 GPUs", "DropSpare", "other/big", "0.50", "3h12m"):
        assert needle in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_plan_of_a_running_run_shows_width_and_funding() -> None:
    run = run_obj(
        phase="Running",
        width={"min": 64, "max": 128, "desired": 128, "allocated": 128, "pending": 0},
        funding={
            "ownedGPUs": 96,
            "borrowedGPUs": 32,
            "sponsors": [{"owner": "org:vision", "kind": "sponsor", "gpus": 32, "gpuHours": 64}],
        },
    )
    record = views.plan_record(run, None, NOW)
    assert record["width"]["allocated"] == 128
    assert record["funding"]["borrowedGPUs"] == 32
    text = render.plan(record)
    assert "128 allocated of 128 desired" in text
    assert "96 owned, 0 shared, 32 borrowed GPUs (sponsor org:vision 32)" in text


def test_plan_hints_when_nothing_admitted_the_run() -> None:
    record = views.plan_record(run_obj(), None, NOW)
    assert record["phase"] == "Pending"
    assert "not been admitted" in (record["hint"] or "")


def node_obj(name: str, fabric: str, **spec: Any) -> dict[str, Any]:
    alloc = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}
    labels = {
        "region": "us-west",
        "cluster": fabric.replace("nv-", "gpu-"),
        "fabric.domain": fabric,
        "gpu.flavor": "H100-80GB",
    }
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
        "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_plan_shows_the_nodes_its_ranks_cannot_use_per_domain() -> None:
    run = run_obj(phase="Reserved")
    run["spec"].setdefault("template", {"spec": {"containers": [{"name": "t"}]}})
    run["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "requests": {"memory": "100Gi"}
    }
    nodes = [
        node_obj("gpu-a-01", "nv-a", taints=[{"key": "maintenance", "effect": "NoSchedule"}]),
        node_obj("gpu-a-02", "nv-a"),
        node_obj("gpu-a-03", "nv-a"),
        node_obj("gpu-b-01", "nv-b", unschedulable=True),
    ]
    pods = [
        {
            "metadata": {"name": "notebook", "namespace": "lab"},
            "spec": {
                "nodeName": "gpu-a-02",
                "containers": [{"resources": {"requests": {"nvidia.com/gpu": "8"}}}],
            },
            "status": {"phase": "Running"},
        },
        {
            "metadata": {"name": "cache", "namespace": "lab"},
            "spec": {
                "nodeName": "gpu-a-03",
                "containers": [{"resources": {"requests": {"memory": "480Gi"}}}],
            },
            "status": {"phase": "Running"},
        },
    ]
    excluded = views.excluded_record(run, nodes, pods)
    assert excluded == [
        {
            "domain": "us-west/gpu-a/nv-a",
            "nodes": 3,
            "excluded": 3,
            "reasons": {"GPUs held by other pods": 1, "tainted": 1, "too little memory": 1},
        },
        {"domain": "us-west/gpu-b/nv-b", "nodes": 1, "excluded": 1, "reasons": {"cordoned": 1}},
    ]
    text = render.plan(views.plan_record(run, None, NOW, excluded))
    assert "Excluded nodes (take none of its ranks), per domain:" in text
    assert "GPUs held by other pods 1, tainted 1, too little memory 1" in text


# ---------------------------------------------------------------------------- usage


def test_usage_recomputes_headroom_from_live_leases() -> None:
    leases = [
        lease("a", node="gpu-a-01"),
        lease("b", node="gpu-a-02"),
        lease("c", run=("team", "nlp"), owner="org:ai:rai:nlp", funding=FundingKind.FAMILY),
        lease(
            "d",
            node="gpu-b-01",
            envelope="vision-lending/vision-h100-nv-b",
            payer="org:vision",
            funding=FundingKind.SPONSOR,
        ),
        lease("old", closed="Completed", end=T0 + timedelta(hours=1)),
    ]
    record = views.usage_record(budgets(), leases, NOW, owner="org:ai:rai:sys")
    envs = {e["envelope"]: e for e in record["envelopes"]}
    assert set(envs) == {"west-h100-nv-a", "west-h100-sprint"}
    nv_a = envs["west-h100-nv-a"]
    assert (nv_a["usedGPUs"], nv_a["headroomGPUs"]) == (24, 72)
    assert (nv_a["owned"], nv_a["shared"], nv_a["borrowedOut"]) == (16, 8, 0)
    assert nv_a["usedGPUHours"] == pytest.approx(3 * 8 * 2 + 8 * 1)
    assert nv_a["status"] is None
    sprint = envs["west-h100-sprint"]
    assert sprint["window"].startswith("opens in")
    assert sprint["headroomGPUHours"] == 20000
    (cap,) = record["aggregateCaps"]
    assert (cap["usedGPUs"], cap["headroomGPUs"]) == (24, 104)
    assert "recomputed from 5 Leases" in record["source"]
    vision = views.usage_record(budgets(), leases, NOW, owner="org:vision")
    (env,) = vision["envelopes"]
    assert env["borrowedOut"] == 8 and env["lending"]["lentGPUs"] == 8
    for width in (80, 120):
        text = render.usage(record, width)
        assert all(len(line) <= width for line in text.splitlines()), text
        assert "24/96" in text and "west-h100-sprint" in text


def test_usage_compares_budget_status_with_the_live_figures() -> None:
    west = budgets()[0]
    west["status"] = {
        "updatedAt": rfc3339(NOW),
        "envelopes": [
            {"name": "west-h100-nv-a", "headroom": {"concurrency": 88}},
            {"name": "west-h100-sprint", "headroom": {"concurrency": 50}},
        ],
    }
    record = views.usage_record([west], [lease("a")], NOW)
    envs = {e["envelope"]: e for e in record["envelopes"]}
    assert envs["west-h100-nv-a"]["status"]["agrees"]
    assert not envs["west-h100-sprint"]["status"]["agrees"]
    assert "1 of 1 Budgets carry a status" in record["budgetStatus"]
    assert "west-h100-sprint status says 50 free" in render.usage(record)


# ---------------------------------------------------------------------------- leases, pods


def test_lease_rows_show_payer_reason_and_closure() -> None:
    rows = views.lease_rows(
        [lease("b", group=1, start=T0 + timedelta(minutes=1)), lease("a", closed="Shrink")],
        NOW,
    )
    assert [r["name"] for r in rows] == ["a", "b"]
    first = rows[0]
    assert first["state"] == "closed: Shrink" and first["held"] == "2h"
    assert first["payer"] == {
        "owner": "org:ai:rai:sys",
        "budget": "west-h100",
        "envelope": "west-h100-nv-a",
        "kind": "owned",
    }
    assert rows[1]["group"] == 1 and rows[1]["state"] == "open"
    assert "west-h100/west-h100-nv-a" in render.leases(rows)


def test_pod_rows() -> None:
    pod = {
        "metadata": {
            "name": "run-128-groups-g0-r1",
            "creationTimestamp": rfc3339(T0),
            "labels": {
                "rq.davidlangworthy.io/group": "0",
                "rq.davidlangworthy.io/rank": "1",
                "rq.davidlangworthy.io/role": "Active",
            },
        },
        "spec": {
            "nodeName": "gpu-a-01",
            "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
        },
        "status": {"phase": "Running", "containerStatuses": [{"ready": True}]},
    }
    (row,) = views.pod_rows([pod], NOW)
    assert row == {
        "name": "run-128-groups-g0-r1",
        "group": "0",
        "rank": "1",
        "role": "Active",
        "node": "gpu-a-01",
        "gpus": 8,
        "phase": "Running",
        "ready": "1/1",
        "age": "2h",
    }


# ---------------------------------------------------------------------------- explain


def test_a_real_lottery_replays_as_verified() -> None:
    record = views.replay_audit(audit(seed(), 20, tokens()))
    assert record["verdict"] == "verified"
    assert record["replayed"] == record["recorded"] and record["recorded"]


def test_a_tampered_draw_is_a_mismatch() -> None:
    published = audit(seed(), 20, tokens())
    tampered = copy.deepcopy(published)
    tampered["draws"][0]["run"] = "team/victim"
    tampered["draws"][0]["owner"] = "org:ai:rai:nlp"
    record = views.replay_audit(tampered)
    assert record["verdict"] == "MISMATCH"
    assert "step 0" in record["detail"]
    other_seed = copy.deepcopy(published)
    other_seed["seed"] = lottery.lottery_seed("elsewhere", "uid-9", NOW)
    assert views.replay_audit(other_seed)["verdict"] in ("verified", "MISMATCH")
    assert views.replay_audit({"seed": "", "draws": []})["verdict"] == "no lottery"
    no_tokens = {**published, "tokens": []}
    assert views.replay_audit(no_tokens)["verdict"] == "unverifiable"


def test_explain_finds_and_verifies_the_lottery_that_cut_the_run() -> None:
    the_seed = seed()
    record_audit = audit(the_seed, 20, tokens())
    drawn = {d["run"] for d in record_audit["draws"]}
    assert label(RUN) in drawn, "the sample seed must draw the explained run"
    closure = f"RandomPreempt({the_seed})"
    leases = [
        lease("run-128-groups-g0-r0"),
        lease("run-128-groups-g0-r1", node="gpu-a-02", rank=1),
        lease(
            "run-128-groups-g3-r0",
            group=3,
            node="gpu-b-01",
            envelope="vision-lending/vision-h100-nv-b",
            payer="org:vision",
            funding=FundingKind.SPONSOR,
            closed=closure,
        ),
        lease("someone-else", run=("other", "big")),
    ]
    resv = reservation("resv-9", state="Released", activatedAt=rfc3339(NOW), audit=record_audit)
    unrelated = reservation("resv-x", state="Released", audit={**record_audit, "seed": "ab"})
    unrelated["status"]["audit"].update(conflictSet=[], tokens=[], draws=[], endedLeases=[])
    nodes = [
        {"metadata": {"name": n, "labels": {"region": "us-west", "cluster": c, "fabric.domain": f}}}
        for n, c, f in (("gpu-a-01", "gpu-a", "nv-a"), ("gpu-a-02", "gpu-a", "nv-a"))
    ]
    record = views.explain_record(run_obj(phase="Running"), leases, [resv, unrelated], nodes, NOW)
    assert [r["name"] for r in record["leases"]] == [
        "run-128-groups-g0-r0",
        "run-128-groups-g0-r1",
        "run-128-groups-g3-r0",
    ]
    (lot,) = record["lotteries"]
    assert lot["reservation"] == "team/resv-9"
    assert lot["verdict"] == "verified"
    assert lot["seed"] == the_seed
    assert "leases ended" in lot["touches"] and "in the conflict set" in lot["touches"]
    assert lot["endedLeasesOfThisRun"] == ["run-128-groups-g3-r0"]
    assert [d["run"] for d in lot["drawsOnThisRun"]] == [label(RUN)]
    assert record["unmatchedSeeds"] == []
    (group0,) = [g for g in record["placement"] if g["group"] == 0]
    assert group0["domain"] == "us-west/gpu-a/nv-a"
    assert group0["nodes"] == ["gpu-a-01", "gpu-a-02"] and group0["gpus"] == 16
    payers = {p["owner"]: p for p in record["funding"]["byPayer"]}
    assert payers["org:ai:rai:sys"]["openGPUs"] == 16
    assert payers["org:vision"] == {
        "owner": "org:vision",
        "envelope": "vision-lending/vision-h100-nv-b",
        "kind": "sponsor",
        "openGPUs": 0,
        "leases": 1,
    }
    assert record["funding"]["summary"]["ownedGPUs"] == 16
    text = render.explain(record, 120)
    assert "verified" in text and the_seed in text
    assert f"RandomPreempt({the_seed[:12]}…)" in text
    assert all(len(line) <= 120 for line in text.splitlines())


def test_explain_reports_a_preemption_seed_without_its_audit() -> None:
    closed = lease("run-128-groups-g0-r0", closed="RandomPreempt(abc123)")
    record = views.explain_record(run_obj(), [closed], [], [], NOW)
    assert record["unmatchedSeeds"] == ["abc123"]
    assert "cannot replay" in render.explain(record)


# ---------------------------------------------------------------------------- edits


def test_sponsor_edits_are_validated_merge_patches() -> None:
    run = run_obj()
    edit = views.sponsors_edit(run, "add", "lab:audio")
    assert edit.patch == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"funding": {"sponsors": ["org:vision", "lab:audio"]}},
    }
    assert views.sponsors_edit(run, "add", "org:vision").patch is None
    removed = views.sponsors_edit(run, "remove", "org:vision")
    assert removed.patch is not None
    assert removed.patch["spec"]["funding"]["sponsors"] is None
    with pytest.raises(views.ViewError, match="not a sponsor"):
        views.sponsors_edit(run, "remove", "lab:nobody")
    with pytest.raises(views.ViewError, match="invalid owner"):
        views.sponsors_edit(run, "add", "Not An Owner")
    run["spec"]["funding"]["allowBorrow"] = False
    assert views.sponsors_edit(run, "add", "lab:audio").notes
    record = views.sponsors_record(
        run_obj(funding={"sponsors": [{"owner": "org:vision", "kind": "sponsor", "gpus": 32}]})
    )
    assert record["sponsors"] == [
        {"owner": "org:vision", "kind": "sponsor", "gpus": 32, "gpuHours": 0.0}
    ]


def test_shrink_validates_against_min_and_step() -> None:
    run = run_obj()
    edit = views.shrink_edit(run, to=96)
    assert edit.patch == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"malleable": {"desiredTotalGPUs": 96}},
    }
    assert views.shrink_edit(run, by=64).patch is not None
    for kwargs, message in (
        ({"to": 80}, "off the step grid"),
        ({"to": 32}, "below malleable.minTotalGPUs"),
        ({"by": 96}, "below malleable.minTotalGPUs"),
        ({"by": 0}, "positive"),
        ({"to": 160}, "above the current desired width"),
    ):
        with pytest.raises(views.ViewError, match=message):
            views.shrink_edit(run, **kwargs)
    assert views.shrink_edit(run, to=128).patch is None
    fixed = run_obj()
    del fixed["spec"]["malleable"]
    with pytest.raises(views.ViewError, match="not malleable"):
        views.shrink_edit(fixed, to=64)


# ---------------------------------------------------------------------------- watch


def test_watch_lines_for_run_reservation_and_lease_changes() -> None:
    before = run_obj(phase="Reserved")
    after = run_obj(
        phase="Running",
        width={"min": 64, "max": 128, "desired": 128, "allocated": 96, "pending": 32},
        funding={"ownedGPUs": 96},
    )
    messages = [e["message"] for e in views.run_events(after, before, NOW)]
    assert messages[0] == "phase Reserved → Running"
    assert "width 96 allocated of 128 desired, 32 pending" in messages[1]
    assert messages[2].startswith("funding 96 owned")
    assert views.is_terminal(run_obj(phase="Failed")) and not views.is_terminal(after)
    old = reservation(state="Pending", countdownSeconds=600)
    new = reservation(state="Pending", countdownSeconds=540)
    (line,) = views.reservation_events(new, old, NOW)
    assert "countdown 9m" in line["message"]
    assert views.reservation_events(new, new, NOW) == []
    opened = lease("x")
    (line,) = views.lease_events(opened, None, NOW)
    assert line["message"].startswith("opened 8 GPUs on gpu-a-01")
    (line,) = views.lease_events(lease("x", closed="Completed"), opened, NOW)
    assert line["message"].startswith("closed Completed after 2h")
    snapshot = views.watch_snapshot(after, [new], [opened], NOW)
    assert snapshot[-1]["message"] == "1 open (8 GPUs), 0 closed"
    assert render.event(snapshot[0]).startswith("12:00:00  run")


# ---------------------------------------------------------------------------- completions


def tree() -> tuple[completion.Command, ...]:
    return completion.command_tree(build_parser())


def test_the_command_tree_is_the_parsers() -> None:
    commands = {c.key: c for c in tree()}
    assert {name for name, _ in commands[""].subcommands} == {
        "submit",
        "plan",
        "watch",
        "explain",
        "budgets",
        "sponsors",
        "shrink",
        "leases",
        "pods",
        "completions",
        "list",
        "cancel",
        "logs",
        "owners",
        "version",
    }
    assert {name for name, _ in commands["sponsors"].subcommands} == {"list", "add", "remove"}
    assert commands["completions"].positional_choices == ("bash", "zsh", "fish")
    assert commands["plan"].runs and not commands["budgets usage"].runs
    flags = {f for o in commands["shrink"].options for f in o.flags}
    assert {"--by", "--to", "-n", "--namespace", "-o", "--kubeconfig"} <= flags


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_every_script_names_every_command_and_option(shell: str) -> None:
    text = completion.script(shell, tree())
    for command in tree():
        for name, _ in command.subcommands:
            assert name in text
        for option in command.options:
            for flag in option.flags:
                assert flag.lstrip("-") in text
    assert "table wide json yaml name jsonpath= custom-columns=" in text


def test_the_plugin_completion_protocol() -> None:
    t = tree()
    assert completion.complete(t, ["sp"]) == (["sponsors"], completion.DIRECTIVE_NO_FILES)
    assert completion.complete(t, ["sponsors", ""])[0] == ["list", "add", "remove"]
    assert completion.complete(t, ["plan", "-o", ""])[0] == list(output.FORMATS)
    assert completion.complete(t, ["submit", "-f", ""]) == ([], completion.DIRECTIVE_DEFAULT)
    assert "--owner" in completion.complete(t, ["-n", "x", "budgets", "usage", "--o"])[0]
    assert completion.complete(t, ["completions", "z"])[0] == ["zsh"]


def _bash_complete(script: str, words: list[str]) -> list[str]:
    program = (
        script
        + "\nCOMP_WORDS=("
        + " ".join(json.dumps(w) for w in words)
        + f")\nCOMP_CWORD={len(words) - 1}\n_kubectl_runs\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile"], input=program, text=True, capture_output=True, check=True
    )
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_the_bash_script_completes_in_a_real_bash() -> None:
    script = completion.script("bash", tree())
    assert _bash_complete(script, ["kubectl-runs", "bu"]) == ["budgets"]
    assert _bash_complete(script, ["kubectl-runs", "budgets", ""]) == ["usage"]
    assert "--owner" in _bash_complete(script, ["kubectl-runs", "budgets", "usage", "--o"])
    assert _bash_complete(script, ["kubectl-runs", "-n", "team", "plan", "-o", "y"]) == ["yaml"]
    assert _bash_complete(script, ["kubectl-runs", "completions", "f"]) == ["fish"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_the_other_scripts_parse(shell: str) -> None:
    binary = shutil.which(shell)
    if binary is None:
        pytest.skip(f"{shell} not installed")
    script = completion.script(shell, tree())
    done = subprocess.run([binary, "-n"], input=script, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- rendering


def test_tables_fit_the_terminal_and_keep_names_whole() -> None:
    rows = [["a-long-envelope-name", "x" * 60, "y" * 40]]
    text = render.table(["NAME", "WIDE", "WIDER"], rows, width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "a-long-envelope-name" in text and "…" in text
    assert render.dump({"b": 1, "a": [1]}, "yaml") == "b: 1\na:\n- 1"
    assert json.loads(render.dump({"x": None}, "json")) == {"x": None}


# ---------------------------------------------------------------------------- krew


def test_the_krew_manifest_installs_the_shim_that_runs_the_plugin() -> None:
    repo = SAMPLES.parents[1]
    manifest = yaml.safe_load((repo / "plugins/krew/runs.yaml").read_text())
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin" and manifest["metadata"]["name"] == "runs"
    assert "pip install" in manifest["spec"]["caveats"]
    (platform,) = manifest["spec"]["platforms"]
    version = manifest["spec"]["version"]
    # the archive hack/krew_archive.py builds from plugins/krew/ (tests/deploy/test_krew.py)
    assert platform["uri"] == (
        "https://github.com/davidlangworthy/jobtree/releases/download/"
        f"{version}/kubectl-runs-{version}.tar.gz"
    )
    assert platform["bin"] == "kubectl-runs"
    for entry in platform["files"]:
        assert (repo / "plugins/krew" / entry["from"]).is_file()
    shim = repo / "plugins/krew/kubectl-runs"
    done = subprocess.run(
        [str(shim), "completions", "bash"],
        env={"JOBTREE_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "complete -F _kubectl_runs kubectl-runs" in done.stdout
