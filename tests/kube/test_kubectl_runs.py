"""`kubectl runs` end to end: the real kubectl discovers the installed `kubectl-runs` plugin on
PATH and runs it against the real API server (no mocks). Objects the services would write
(Leases, Reservation forecasts and audits, Run status) are written here with kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.engine import lottery
from shared.engine.bindplan import LeaseIntent
from shared.engine.model import FundingKind, LeaseReason, Role
from shared.kube.translate import lease_manifest, rfc3339
from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NS = "jobtree-cli-test"
SUITE = "jobtree.test/suite"
SUITE_VALUE = "kubectl-runs"
START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
NODES = {"cli-gpu-a-01": "nv-a", "cli-gpu-a-02": "nv-a", "cli-gpu-b-01": "nv-b"}
SCOPE = {
    "kind": "Location",
    "flavor": "H100-80GB",
    "selector": {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"},
}


class Cli:
    """Runs `kubectl runs …` through the real kubectl with the plugin on PATH."""

    def __init__(self, kube: ControlPlane) -> None:
        self.kube = kube
        self.env = kube.env()
        self.env["PATH"] = f"{VENV_BIN}{os.pathsep}{self.env['PATH']}"
        self.env["COLUMNS"] = "120"

    def __call__(
        self, *args: str, input: str | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.kube.bin_dir / "kubectl"), "runs", *args],
            input=input,
            text=True,
            capture_output=True,
            env=self.env,
            timeout=60,
        )
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.kube.kubectl(*args, input=input).stdout


NODE_RESOURCES = {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi", "pods": "110"}
"""What a kubelet reports for one test node: a rank pod must fit its CPU, memory and pods too."""


def node(name: str, fabric: str) -> dict[str, Any]:
    cluster = "gpu-a" if fabric == "nv-a" else "gpu-b"
    labels = {"region": "us-west", "cluster": cluster, "fabric.domain": fabric}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {**labels, "gpu.flavor": "H100-80GB", SUITE: SUITE_VALUE},
        },
    }


def lease(
    name: str,
    run: str,
    node_name: str,
    *,
    gpus: int = 8,
    group: int = 0,
    rank: int = 0,
    envelope: str = "west-h100/west-h100-nv-a",
    payer: str = "org:ai:rai:sys",
    funding: FundingKind = FundingKind.OWNED,
) -> dict[str, Any]:
    intent = LeaseIntent(
        name=name,
        run=(NS, run),
        owner="org:ai:rai:sys",
        node=node_name,
        gpus=gpus,
        role=Role.ACTIVE,
        group=group,
        rank=rank,
        envelope=envelope,
        payer_owner=payer,
        funding=funding,
        start=START,
        reason=LeaseReason.START,
        expected_end=None,
        comp_path=(f"GROUP[{group}]", f"RANK[{rank}]"),
    )
    manifest = lease_manifest(intent, run_uid=f"uid-{run}", gen=1)
    manifest["metadata"]["labels"][SUITE] = SUITE_VALUE
    return manifest


def run_manifest(name: str) -> dict[str, Any]:
    run: dict[str, Any] = yaml.safe_load(
        (REPO / "config/samples/runs/run-128-groups.yaml").read_text()
    )
    run["metadata"] = {"name": name, "namespace": NS}
    return run


def reservation(name: str, run: str) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Reservation",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "runRef": {"name": run},
            "intendedSlice": {"domain": SCOPE["selector"], "nodes": ["cli-gpu-a-01"]},
            "payingEnvelope": "west-h100/west-h100-nv-a",
            "earliestStart": rfc3339(datetime.now(UTC) + timedelta(hours=2)),
        },
    }


@pytest.fixture(scope="module")
def cli(crds: ControlPlane) -> Iterator[Cli]:
    assert (VENV_BIN / "kubectl-runs").exists(), "install the plugin: .venv/bin/pip install -e ."
    kube = crds
    ensure_namespace(kube, NS)
    nodes = [node(name, fabric) for name, fabric in NODES.items()]
    kube.kubectl(
        "apply", "-f", "-", input=json.dumps({"kind": "List", "apiVersion": "v1", "items": nodes})
    )
    yield Cli(kube)
    for kind in ("leases.rq.davidlangworthy.io", "nodes"):
        kube.kubectl("delete", kind, "-l", f"{SUITE}={SUITE_VALUE}", "--wait=false", check=False)
    for kind in ("runs.rq.davidlangworthy.io", "reservations.rq.davidlangworthy.io", "pods"):
        kube.kubectl("delete", kind, "--all", "-n", NS, "--wait=false", check=False)


def apply(cli: Cli, obj: dict[str, Any]) -> None:
    cli.kubectl("apply", "-f", "-", input=json.dumps(obj))


def patch_status(
    cli: Cli, kind: str, name: str, status: dict[str, Any], ns: str | None = NS
) -> None:
    where = ["-n", ns] if ns else []
    cli.kubectl(
        "patch",
        kind,
        name,
        *where,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def envelope(record: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [e for e in record["envelopes"] if e["envelope"] == name]
    return found


# ---------------------------------------------------------------------------- tests


def test_submit_and_budgets_usage_from_live_leases(cli: Cli) -> None:
    cli.kubectl("delete", "budgets.rq.davidlangworthy.io", "west-h100", "--ignore-not-found")
    sample = str(REPO / "config/samples/budgets/budget-west-h100.yaml")
    done = cli("submit", "-f", sample)
    assert done.stdout.strip() == "budgets.rq.davidlangworthy.io/west-h100 created"
    assert cli("submit", "-f", sample).stdout.strip().endswith("west-h100 unchanged")

    before = cli.json("budgets", "usage", "--owner", "org:ai:rai:sys")
    apply(cli, lease("cli-usage-r0", "cli-usage", "cli-gpu-a-01"))
    after = cli.json("budgets", "usage", "--owner", "org:ai:rai:sys")
    nv_a = envelope(after, "west-h100-nv-a")
    assert nv_a["usedGPUs"] == envelope(before, "west-h100-nv-a")["usedGPUs"] + 8
    assert nv_a["headroomGPUs"] == 96 - nv_a["usedGPUs"]
    assert nv_a["owned"] >= 8
    (cap,) = after["aggregateCaps"]
    assert cap["headroomGPUs"] == 128 - cap["usedGPUs"]
    assert {e["owner"] for e in after["envelopes"]} == {"org:ai:rai:sys"}
    assert after["source"].startswith("live: recomputed from")

    table = cli("budgets", "usage", "--owner", "org:ai:rai:sys").stdout  # the guide's command
    assert "org:ai:rai:sys (Budget west-h100, H100-80GB)" in table
    row = next(line for line in table.splitlines() if line.startswith("west-h100-nv-a"))
    assert f"{nv_a['usedGPUs']}/96" in row.split()
    assert str(nv_a["headroomGPUs"]) in row.split()
    assert "west-h100-sprint" in table and "west-h100/west-h100-total" in table
    assert all(len(line) <= 120 for line in table.splitlines())
    missing = cli("budgets", "usage", "--owner", "org:nobody", ok=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1


def test_submit_validates_with_field_paths_and_applies_runs(cli: Cli) -> None:
    bad = run_manifest("cli-bad")
    bad["spec"]["resources"]["totalGPUs"] = 0
    bad["spec"]["priority"] = 5
    done = cli("submit", "-f", "-", input=json.dumps(bad), ok=False)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: stdin: document 1 (Run cli-bad):")
    assert "spec.priority" in line and "spec.resources.totalGPUs" in line

    docs = "---\n".join(yaml.safe_dump(run_manifest(n)) for n in ("cli-plan", "cli-explain"))
    done = cli("submit", "-f", "-", "-n", NS, input=docs)
    assert done.stdout.splitlines() == [
        "runs.rq.davidlangworthy.io/cli-plan created",
        "runs.rq.davidlangworthy.io/cli-explain created",
    ]
    again = yaml.safe_load(cli("submit", "-f", "-", "-n", NS, "-o", "yaml", input=docs).stdout)
    assert [r["result"] for r in again] == ["unchanged", "unchanged"]
    managers = json.loads(
        cli.kubectl("get", "run", "cli-plan", "-n", NS, "-o", "json", "--show-managed-fields")
    )
    assert "kubectl-runs" in {m["manager"] for m in managers["metadata"]["managedFields"]}


def test_plan_shows_the_reservation_forecast(cli: Cli) -> None:
    apply(cli, reservation("cli-plan-resv", "cli-plan"))
    forecast = {
        "deficitGPUs": 24,
        "scope": SCOPE,
        "remedies": [
            {"action": "DropSpare", "run": "other/big", "gpus": 8, "message": "drop 8 spare GPUs"},
            {"action": "Shrink", "run": "other/mall", "gpus": 8, "message": "shrink by 8 GPUs"},
            {"action": "Lottery", "gpus": 8, "message": "draw lots for 8 GPUs"},
        ],
        "conflictSet": ["other/big", "other/mall"],
        "killProbability": {"other/big": 0.5, "other/mall": 0.25},
        "confidence": "walltime",
    }
    patch_status(
        cli,
        "reservations.rq.davidlangworthy.io",
        "cli-plan-resv",
        {"state": "Pending", "countdownSeconds": 7200, "forecast": forecast},
    )
    now = rfc3339(datetime.now(UTC))
    patch_status(
        cli,
        "runs.rq.davidlangworthy.io",
        "cli-plan",
        {
            "phase": "Reserved",
            "pendingReservation": "cli-plan-resv",
            "message": "InsufficientCapacity: 24 GPUs short in us-west/gpu-a/nv-a",
            "conditions": [
                {
                    "type": "Scheduled",
                    "status": "False",
                    "reason": "InsufficientCapacity",
                    "lastTransitionTime": now,
                }
            ],
        },
    )
    text = cli("plan", "cli-plan", "-n", NS).stdout
    for needle in (
        "Phase:   Reserved",
        "Reason:  InsufficientCapacity",
        f"{NS}/cli-plan-resv (Pending)",
        "24 GPUs in Location H100-80GB us-west/gpu-a/nv-a",
        "walltime: running leases end by then",
        "DropSpare",
        "other/big",
        "0.50",
        "forecaster's countdown 2h",
    ):
        assert needle in text, needle
    eta = next(line for line in text.splitlines() if line.startswith("ETA:"))
    assert "(in 1h59m" in eta or "(in 2h" in eta
    record = cli.json("plan", f"{NS}/cli-plan")
    assert record["reservation"]["deficitGPUs"] == 24
    assert 7000 < record["reservation"]["countdownSeconds"] <= 7200
    assert [r["action"] for r in record["reservation"]["remedies"]] == [
        "DropSpare",
        "Shrink",
        "Lottery",
    ]
    by_yaml = yaml.safe_load(cli("plan", "cli-plan", "-A", "-o", "yaml").stdout)
    assert (by_yaml["run"], by_yaml["phase"]) == (f"{NS}/cli-plan", "Reserved")
    assert by_yaml["reservation"]["conflictSet"] == record["reservation"]["conflictSet"]


def test_explain_replays_the_lottery_from_its_seed(cli: Cli) -> None:
    tokens = [
        lottery.Token("org:ai:rai:nlp", ("other", "victim"), None, 8, ("victim-g0-r0",)),
        lottery.Token("org:ai:rai:sys", (NS, "cli-explain"), 1, 8, ("cli-explain-g1-r0",), 32, 64),
        lottery.Token("org:ai:rai:cv", ("other", "big"), None, 16, ("big-g0-r0",)),
    ]
    activation = datetime(2026, 1, 1, tzinfo=UTC)  # fixed: this seed draws cli-explain
    seed = lottery.lottery_seed("H100-80GB@us-west/gpu-a/nv-a", "uid-cli-1", activation)
    draws = lottery.run_lottery(seed, tokens, 20)
    assert any(d.token.run == (NS, "cli-explain") for d in draws)

    def label(key: tuple[str, str]) -> str:
        return f"{key[0]}/{key[1]}"

    audit = {
        "seed": seed,
        "scope": SCOPE,
        "deficitGPUs": 20,
        "conflictSet": sorted({label(t.run) for t in tokens}),
        "tokens": [
            {
                "owner": t.owner,
                "run": label(t.run),
                "gpus": t.gpus,
                "leases": list(t.lease_names),
                **({} if t.group is None else {"group": t.group}),
                **({} if t.width is None else {"width": t.width}),
                **({} if t.run_slack is None else {"runSlack": t.run_slack}),
            }
            for t in tokens
        ],
        "draws": [
            {
                "step": d.step,
                "owner": d.owner,
                "run": label(d.token.run),
                "gpus": d.token.gpus,
                **({} if d.token.group is None else {"group": d.token.group}),
            }
            for d in draws
        ],
        "endedLeases": [name for d in draws for name in d.token.lease_names],
    }
    for manifest in (
        lease("cli-explain-g0-r0", "cli-explain", "cli-gpu-a-01"),
        lease("cli-explain-g0-r1", "cli-explain", "cli-gpu-a-02", rank=1),
        lease(
            "cli-explain-g1-r0",
            "cli-explain",
            "cli-gpu-b-01",
            group=1,
            envelope="vision-lending/vision-h100-nv-b",
            payer="lab:vision",
            funding=FundingKind.SPONSOR,
        ),
    ):
        apply(cli, manifest)
    patch_status(
        cli,
        "leases.rq.davidlangworthy.io",
        "cli-explain-g1-r0",
        {
            "closed": True,
            "endTime": rfc3339(datetime.now(UTC)),
            "closureReason": f"RandomPreempt({seed})",
        },
        ns=None,
    )
    apply(cli, reservation("cli-lottery", "cli-plan"))
    patch_status(
        cli,
        "reservations.rq.davidlangworthy.io",
        "cli-lottery",
        {"state": "Released", "activatedAt": rfc3339(activation), "audit": audit},
    )
    text = cli("explain", "cli-explain", "-n", NS).stdout
    assert f"Lottery of reservation {NS}/cli-lottery (for {NS}/cli-plan):" in text
    assert f"Seed:             {seed}" in text
    assert "Replay:           verified" in text
    assert "us-west/gpu-a/nv-a" in text  # placement from the real Node labels
    assert "cli-gpu-a-01,cli-gpu-a-02" in text
    assert f"RandomPreempt({seed[:12]}…)" in text
    record = cli.json("explain", "cli-explain", "-n", NS)
    (lot,) = record["lotteries"]
    assert lot["verdict"] == "verified"
    assert lot["replayed"] == lot["draws"]
    assert lot["endedLeasesOfThisRun"] == ["cli-explain-g1-r0"]
    payers = {p["owner"]: p for p in record["funding"]["byPayer"]}
    assert payers["org:ai:rai:sys"]["openGPUs"] == 16
    assert payers["lab:vision"]["kind"] == "sponsor"


def test_leases_and_pods_of_a_run(cli: Cli) -> None:
    rows = cli.json("leases", "cli-explain", "-n", NS)
    assert [r["name"] for r in rows] == [
        "cli-explain-g0-r0",
        "cli-explain-g0-r1",
        "cli-explain-g1-r0",
    ]
    assert rows[2]["closure"].startswith("RandomPreempt(")
    table = cli("leases", "cli-explain", "-n", NS).stdout
    assert "cli-explain-g0-r1" in table and "west-h100/west-h100-nv-a" in table
    assert [r["name"] for r in cli.json("leases", "cli-explain", "-A")] == [r["name"] for r in rows]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "cli-explain-g0-r0",
            "namespace": NS,
            "labels": {
                "rq.davidlangworthy.io/run": "cli-explain",
                "rq.davidlangworthy.io/group": "0",
                "rq.davidlangworthy.io/rank": "0",
                "rq.davidlangworthy.io/role": "Active",
            },
        },
        "spec": {
            "containers": [
                {
                    "name": "hold",
                    "image": "registry.k8s.io/pause:3.10",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ]
        },
    }
    apply(cli, pod)
    (row,) = cli.json("pods", "cli-explain", "-n", NS)
    assert (row["name"], row["group"], row["rank"], row["gpus"]) == (
        "cli-explain-g0-r0",
        "0",
        "0",
        8,
    )
    assert "cli-explain-g0-r0" in cli("pods", "cli-explain", "-n", NS).stdout


def test_shrink_and_sponsors_patch_the_spec(cli: Cli) -> None:
    def spec() -> dict[str, Any]:
        got: dict[str, Any] = json.loads(
            cli.kubectl("get", "run", "cli-plan", "-n", NS, "-o", "json")
        )
        return got["spec"]

    assert "desired width 128 → 96 GPUs" in cli("shrink", "cli-plan", "-n", NS, "--to", "96").stdout
    assert spec()["malleable"]["desiredTotalGPUs"] == 96
    bad = cli("shrink", "cli-plan", "-n", NS, "--by", "16", ok=False)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"error: run {NS}/cli-plan: 80 GPUs is off the step grid 64 + n × 32 (widths: 64, 96)"
    ]
    assert cli.json("shrink", "cli-plan", "-n", NS, "--by", "32")["desiredTotalGPUs"] == 64

    cli("sponsors", "add", "cli-plan", "lab:audio", "-n", NS)
    assert spec()["funding"]["sponsors"] == ["org:vision", "lab:audio"]
    listed = cli.json("sponsors", "list", "cli-plan", "-n", NS)
    assert [s["owner"] for s in listed["sponsors"]] == ["org:vision", "lab:audio"]
    assert "lab:audio" in cli("sponsors", "list", "cli-plan", "-n", NS).stdout
    cli("sponsors", "remove", "cli-plan", "org:vision", "-n", NS)
    assert spec()["funding"]["sponsors"] == ["lab:audio"]
    missing = cli("sponsors", "remove", "cli-plan", "org:vision", "-n", NS, ok=False)
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1


def test_unknown_run_is_one_line_and_non_zero(cli: Cli) -> None:
    done = cli("plan", "no-such-run", "-n", NS, ok=False)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr == f'error: run "no-such-run" not found in namespace "{NS}"\n'
    # without -n: the kubeconfig context's namespace (the test kubeconfig says "default")
    done = cli("plan", "no-such-run", ok=False)
    assert done.stderr == 'error: run "no-such-run" not found in namespace "default"\n'
    config = yaml.safe_load(cli.kube.kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = NS
    other = cli.kube.workdir / "kubeconfig-cli"
    other.write_text(yaml.safe_dump(config))
    assert cli("plan", "cli-plan", "--kubeconfig", str(other)).stdout.startswith(
        f"Run:     {NS}/cli-plan"
    )
    usage = cli("plan", ok=False)
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1


def test_completions_come_from_the_command_tree(cli: Cli) -> None:
    script = cli("completions", "bash").stdout
    for name in ("submit", "plan", "watch", "explain", "budgets", "sponsors", "shrink"):
        assert name in script
    assert "complete -F _kubectl_runs kubectl-runs" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_kubectl_plugin_completion_protocol(cli: Cli, tmp_path: Path) -> None:
    """kubectl itself completes `kubectl runs …` through `kubectl_complete-runs`."""
    helper = tmp_path / "kubectl_complete-runs"
    helper.write_text('#!/bin/sh\nexec kubectl-runs __complete "$@"\n')
    helper.chmod(0o755)
    env = {**cli.env, "PATH": f"{tmp_path}{os.pathsep}{cli.env['PATH']}"}
    done = subprocess.run(
        [str(cli.kube.bin_dir / "kubectl"), "__complete", "runs", "budgets", "u"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines()[0] == "usage"


def test_watch_streams_until_a_terminal_phase(cli: Cli) -> None:
    apply(cli, run_manifest("cli-watch"))
    proc = subprocess.Popen(
        [
            str(cli.kube.bin_dir / "kubectl"),
            "runs",
            "watch",
            "cli-watch",
            "-n",
            NS,
            "--timeout",
            "40",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli.env,
    )
    assert proc.stdout is not None
    lines = []
    while True:  # the snapshot ends with the lease summary
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        lines.append(line)
        if "(all)" in line:
            break
    patch_status(
        cli,
        "runs.rq.davidlangworthy.io",
        "cli-watch",
        {
            "phase": "Running",
            "width": {"min": 64, "max": 128, "desired": 128, "allocated": 64, "pending": 64},
            "funding": {"ownedGPUs": 64},
        },
    )
    apply(cli, lease("cli-watch-g0-r0", "cli-watch", "cli-gpu-a-01"))
    time.sleep(1)
    patch_status(cli, "runs.rq.davidlangworthy.io", "cli-watch", {"phase": "Completed"})
    out, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, err
    text = "".join(lines) + out
    assert "phase Pending" in text
    assert "phase Pending → Running" in text
    assert "width 64 allocated of 128 desired, 64 pending" in text
    assert "opened 8 GPUs on cli-gpu-a-01" in text
    assert text.rstrip().endswith("phase Running → Completed")


def test_plan_file_is_a_read_only_what_if(cli: Cli, tmp_path: Path) -> None:
    """`plan -f` for a Run not yet submitted: the same engine on the cluster's objects, nothing
    written. The owner's standing envelope funds nv-a only and the nv-b sprint window opens in
    2030, beyond the 30-day horizon: an 8-GPU Run on nv-b has no funded room and nothing bounds
    its wait (conservative, the 24 h lead)."""
    cli("submit", "-f", str(REPO / "config/samples/budgets/budget-west-h100.yaml"))
    patch_status(
        cli,
        "node",
        "cli-gpu-b-01",
        {
            "capacity": NODE_RESOURCES,
            "allocatable": NODE_RESOURCES,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "test",
                    "lastHeartbeatTime": rfc3339(datetime.now(UTC)),
                    "lastTransitionTime": rfc3339(datetime.now(UTC)),
                }
            ],
        },
        ns=None,
    )
    run = run_manifest("cli-whatif")
    run["spec"]["resources"]["totalGPUs"] = 8
    run["spec"].pop("malleable", None)
    run["spec"]["locality"] = {
        "groupGPUs": 8,
        "selector": {"region": "us-west", "cluster": "gpu-b", "fabric.domain": "nv-b"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    reservations_before = cli.kubectl(
        "get", "reservations.rq.davidlangworthy.io", "-n", NS, "-o", "name"
    )

    record = cli.json("plan", "-f", str(path))
    assert record["startsNow"] is False
    assert (record["stage"], record["reason"]) == ("pack", "NoFundedCapacity")
    assert record["confidence"] == "conservative"
    assert abs(record["earliestStartInSeconds"] - 24 * 3600) < 120
    assert record["scope"] == "H100-80GB@us-west/gpu-b/nv-b"
    assert record["expected"]["expectedStart"] == record["earliestStart"]  # nothing to learn from
    assert record["expected"]["basis"] == "no completed Runs yet: walltimes"
    text = cli("plan", "-f", str(path)).stdout
    assert "not submitted" in text and "NoFundedCapacity" in text
    assert "Guarantee:" in text and "conservative" in text and "Expected:  expected ~" in text
    # Read-only: no Run, no Reservation was created.
    missing = cli.kubectl(
        "get", "runs.rq.davidlangworthy.io", "-n", NS, "--ignore-not-found", "-o", "name"
    )
    assert "cli-whatif" not in missing
    assert cli.kubectl("get", "reservations.rq.davidlangworthy.io", "-n", NS, "-o", "name") == (
        reservations_before
    )
    bad = cli("plan", "-f", str(REPO / "config/samples/budgets/budget-west-h100.yaml"), ok=False)
    assert bad.returncode != 0 and "kind: Run" in bad.stderr
