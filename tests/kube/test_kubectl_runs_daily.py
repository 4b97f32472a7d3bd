"""The daily `kubectl runs` loop end to end through the real kubectl and the real API server:
list, cancel, logs, owners, version; kubectl's -o formats, --no-headers, -l; submit -f DIR and
--dry-run; watch's exit codes; the errors for an unreachable server and a missing kubeconfig;
the kubeconfig winning over in-cluster; completion of Run names, namespaces and contexts.

Run status (what admission and the binder would write) is patched here with kubectl. KWOK-less
pods have no kubelet, so `logs` is tested for the request it makes and the server's answer."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.kube.translate import rfc3339
from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace
from tests.kube.test_kubectl_runs import REPO, Cli

pytestmark = pytest.mark.kube

NS = "jobtree-cli-daily"
OTHER = "jobtree-cli-daily-b"


def run_manifest(name: str, ns: str = NS, owner: str = "org:ai:rai:sys", gpus: int = 128) -> Any:
    run: dict[str, Any] = yaml.safe_load(
        (REPO / "config/samples/runs/run-128-groups.yaml").read_text()
    )
    run["metadata"] = {"name": name, "namespace": ns, "labels": {"sweep": name.split("-")[0]}}
    run["spec"]["owner"] = owner
    run["spec"]["resources"]["totalGPUs"] = gpus
    run["spec"].pop("malleable", None)
    run["spec"]["locality"]["groupGPUs"] = min(32, gpus)
    run["spec"]["funding"]["maxBorrowGPUs"] = min(32, gpus)
    return run


def apply(cli: Cli, *objects: Any) -> None:
    body = {"kind": "List", "apiVersion": "v1", "items": list(objects)}
    done = cli.kube.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert done.returncode == 0, done.stderr


def patch_status(cli: Cli, kind: str, name: str, status: dict[str, Any], ns: str = NS) -> None:
    cli.kubectl(
        "patch", kind, name, "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


@pytest.fixture(scope="module")
def cli(crds: ControlPlane) -> Iterator[Cli]:
    for ns in (NS, OTHER):
        ensure_namespace(crds, ns)
    c = Cli(crds)
    runs = [
        run_manifest("alpha-1", gpus=64),
        run_manifest("alpha-2", owner="lab:vision", gpus=32),
        run_manifest("beta-1", gpus=16),
        run_manifest("gamma-1", ns=OTHER, owner="org:ml", gpus=8),
    ]
    apply(c, *runs)
    patch_status(
        c, "runs.rq.davidlangworthy.io", "alpha-1",
        {"phase": "Running", "width": {"allocated": 64, "desired": 64},
         "funding": {"ownedGPUs": 48, "borrowedGPUs": 16}},
    )  # fmt: skip
    resv = {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Reservation",
        "metadata": {"name": "alpha-2-r1", "namespace": NS},
        "spec": {
            "runRef": {"name": "alpha-2"},
            "intendedSlice": {
                "domain": {"region": "r", "cluster": "c", "fabric.domain": "f"},
                "nodes": ["n1"],
            },
            "payingEnvelope": "vision/h100",
            "earliestStart": rfc3339(datetime.now(UTC) + timedelta(hours=3)),
        },
    }
    apply(c, resv)
    patch_status(
        c, "runs.rq.davidlangworthy.io", "alpha-2",
        {"phase": "Reserved", "pendingReservation": "alpha-2-r1",
         "conditions": [{"type": "Scheduled", "status": "False", "reason": "InsufficientCapacity",
                         "lastTransitionTime": rfc3339(datetime.now(UTC))}]},
    )  # fmt: skip
    yield c
    for ns in (NS, OTHER):
        for kind in ("runs.rq.davidlangworthy.io", "reservations.rq.davidlangworthy.io", "pods"):
            c.kube.kubectl("delete", kind, "--all", "-n", ns, "--wait=false", check=False)
    c.kube.kubectl("delete", "node", "cli-daily-kwok", "--wait=false", check=False)


def test_list_shows_phase_reason_width_eta(cli: Cli) -> None:
    text = cli("list", "-n", NS).stdout
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "OWNER", "PHASE", "REASON", "WIDTH", "ETA", "AGE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"alpha-1", "alpha-2", "beta-1"}
    assert rows["alpha-1"][1:5] == ["org:ai:rai:sys", "Running", "-", "64/64"]
    assert rows["alpha-2"][2:5] == ["Reserved", "InsufficientCapacity", "0/32"]
    assert rows["alpha-2"][5:7] in (["in", "2h59m"], ["in", "3h"])
    every = cli("list", "-A").stdout.splitlines()
    assert every[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert any(line.split()[:2] == [OTHER, "gamma-1"] for line in every)
    record = cli.json("list", "-n", NS)
    assert {r["name"]: r["width"]["desired"] for r in record} == {
        "alpha-1": 64, "alpha-2": 32, "beta-1": 16,
    }  # fmt: skip
    (reserved,) = [r for r in record if r["name"] == "alpha-2"]
    assert reserved["reservation"] == f"{NS}/alpha-2-r1" and reserved["earliestStart"]


def test_list_filters_sorts_and_kubectl_outputs(cli: Cli) -> None:
    assert cli("list", "-n", NS, "-o", "name").stdout.splitlines() == [
        "runs.rq.davidlangworthy.io/alpha-1",
        "runs.rq.davidlangworthy.io/alpha-2",
        "runs.rq.davidlangworthy.io/beta-1",
    ]
    names = cli("list", "-n", NS, "--sort", "gpus", "-o", "jsonpath={[*].name}").stdout
    assert names == "alpha-1 alpha-2 beta-1"
    by_eta = cli("list", "-n", NS, "--sort", "eta", "-o", "jsonpath={[0].name}").stdout
    assert by_eta == "alpha-2"
    owned = cli("list", "-n", NS, "--owner", "org:ai:*", "-o", "name").stdout.split()
    assert owned == ["runs.rq.davidlangworthy.io/alpha-1", "runs.rq.davidlangworthy.io/beta-1"]
    assert cli("list", "-n", NS, "--phase", "reserved", "-o", "name").stdout.split() == [
        "runs.rq.davidlangworthy.io/alpha-2"
    ]
    assert cli("list", "-n", NS, "-l", "sweep=beta", "-o", "name").stdout.split() == [
        "runs.rq.davidlangworthy.io/beta-1"
    ]
    columns = cli(
        "list", "-n", NS, "--no-headers", "-o", "custom-columns=RUN:.name,GPUS:.width.desired"
    ).stdout.splitlines()
    assert [c.split() for c in columns] == [["alpha-1", "64"], ["alpha-2", "32"], ["beta-1", "16"]]
    assert "NAME" not in cli("list", "-n", NS, "--no-headers").stdout
    wide = cli("list", "-n", NS, "-o", "wide").stdout
    assert wide.splitlines()[0].split()[-3:] == ["FUNDING", "DOMAINS", "RESERVATION"]
    assert all(len(line) <= 120 for line in wide.splitlines())  # COLUMNS=120 asks for a width
    bad = cli("list", "-n", NS, "-o", "jsonpath={.a", ok=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: -o: JSONPath")


def test_piped_output_is_never_truncated(cli: Cli) -> None:
    env = {k: v for k, v in cli.env.items() if k != "COLUMNS"}
    owner = "org:" + ":".join(["averyveryverylongteamname"] * 5)
    apply(cli, run_manifest("long-1", owner=owner))
    done = subprocess.run(
        [str(cli.kube.bin_dir / "kubectl"), "runs", "list", "-n", NS, "-o", "wide"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert owner in done.stdout and "…" not in done.stdout
    assert "48 owned, 16 borrowed" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) > 160
    cli("cancel", "long-1", "-n", NS, "--yes")


def test_cancel_deletes_the_run(cli: Cli) -> None:
    apply(cli, run_manifest("doomed-1"))
    apply(cli, run_manifest("doomed-2"))
    done = cli("cancel", "doomed-1", "-n", NS, "--yes")
    assert done.stdout.strip() == "runs.rq.davidlangworthy.io/doomed-1 deleted"
    got = cli.kube.kubectl("get", "run", "doomed-1", "-n", NS, check=False)
    assert got.returncode != 0 and "NotFound" in got.stderr
    # not a terminal: no question asked (like kubectl delete); -l selects
    assert cli("cancel", "-l", "sweep=doomed", "-n", NS, "-o", "name").stdout.split() == [
        "runs.rq.davidlangworthy.io/doomed-2"
    ]
    missing = cli("cancel", "doomed-1", "-n", NS, "--yes", ok=False)
    assert missing.returncode == 1
    assert missing.stderr == f'error: run "doomed-1" not found in namespace "{NS}"\n'


def test_logs_asks_the_rank_pod_and_reports_why_there_is_none(cli: Cli) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "alpha-1-g0-r0",
            "namespace": NS,
            "labels": {
                "rq.davidlangworthy.io/run": "alpha-1",
                "rq.davidlangworthy.io/group": "0",
                "rq.davidlangworthy.io/rank": "0",
                "rq.davidlangworthy.io/role": "Active",
            },
        },
        "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }
    apply(cli, pod)
    # not on a node: the API server answers an empty log (kubectl prints nothing); we say why
    done = cli("logs", "alpha-1", "-n", NS, ok=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"error: logs of pod {NS}/alpha-1-g0-r0: it is not on a node yet (Pending): no log\n"
    )
    # on a KWOK node: the API server asks a kubelet that does not exist and answers 404
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "cli-daily-kwok", "annotations": {"kwok.x-k8s.io/node": "fake"}},
    }
    pod["metadata"] = {**pod["metadata"], "name": "beta-1-g0-r0"}
    pod["metadata"]["labels"] = {**pod["metadata"]["labels"], "rq.davidlangworthy.io/run": "beta-1"}
    pod["spec"] = {**pod["spec"], "nodeName": "cli-daily-kwok"}
    apply(cli, node, pod)
    kubectl = cli.kube.kubectl("logs", "beta-1-g0-r0", "-n", NS, check=False)
    assert kubectl.returncode == 1 and "pods/log beta-1-g0-r0" in kubectl.stderr
    done = cli("logs", "beta-1", "-n", NS, "--tail", "5", ok=False)
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"error: logs of pod {NS}/beta-1-g0-r0: the API server could not get them from node "
        "cli-daily-kwok's kubelet (the server could not find the requested resource"
    )
    other = cli("logs", "alpha-1", "-n", NS, "--group", "2", "--rank", "1", ok=False)
    assert other.stderr == (
        'error: run "alpha-1": no pod for group 2 rank 1 (group/rank of its pods: 0/0)\n'
    )


def test_owners_names_the_globs_and_their_source(cli: Cli) -> None:
    cli.kube.kubectl("annotate", "namespace", NS, "rq.davidlangworthy.io/owners-", check=False)
    record = cli.json("owners", "-n", NS)
    assert record["globs"] == [] and record["source"].startswith("no annotation")  # closed
    cli.kubectl("annotate", "namespace", NS, "rq.davidlangworthy.io/owners=org:ai:*, lab:vision")
    record = cli.json("owners", "-n", NS)
    assert record["globs"] == ["org:ai:*", "lab:vision"]
    assert record["source"] == f"annotation rq.davidlangworthy.io/owners on namespace {NS}"
    assert "budgetOwners" in record  # the test's admin may list Budgets
    text = cli("owners", "-n", NS).stdout
    assert "Owner globs:" in text and "org:ai:*, lab:vision" in text


def test_version_shows_client_server_and_api(cli: Cli) -> None:
    record = cli.json("version")
    assert record["client"]["version"] == "0.1.0"
    assert record["server"]["gitVersion"].startswith("v1.")
    assert record["api"] == ["rq.davidlangworthy.io/v1"]
    assert record["services"] == []
    assert cli("version", "--client").stdout.strip() == "Client Version: 0.1.0"


def test_submit_dir_recursive_and_dry_runs(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(run_manifest("dir-a")))
    (tmp_path / "sub" / "b.json").write_text(json.dumps(run_manifest("dir-b")))
    (tmp_path / "notes.txt").write_text("not a manifest")
    dry = cli("submit", "-f", str(tmp_path), "--dry-run=server").stdout
    assert dry.strip() == "runs.rq.davidlangworthy.io/dir-a created (server dry run)"
    assert cli.kube.kubectl("get", "run", "dir-a", "-n", NS, check=False).returncode != 0
    done = cli("submit", "-f", str(tmp_path), "-R", "-n", NS).stdout.splitlines()
    assert done == [
        "runs.rq.davidlangworthy.io/dir-a created",
        "runs.rq.davidlangworthy.io/dir-b created",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = cli("submit", "-f", str(empty), ok=False)
    assert bad.returncode == 1 and "no .yaml, .yml or .json files" in bad.stderr
    # client dry run: validated locally, the server is never contacted (an unreachable one)
    env = {**cli.env, "KUBECONFIG": str(unreachable_kubeconfig(cli, tmp_path))}
    client = subprocess.run(
        [str(cli.kube.bin_dir / "kubectl"), "runs", "submit", "-f", str(tmp_path / "a.yaml"),
         "--dry-run=client"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert "dir-a valid (client dry run" in client.stdout
    cli("cancel", "dir-a", "dir-b", "-n", NS, "--yes")


def test_watch_exit_codes(cli: Cli) -> None:
    apply(cli, run_manifest("watched-1"))
    timed = cli("watch", "watched-1", "-n", NS, "--timeout", "1", ok=False)
    assert timed.returncode == 5 and "timeout" in timed.stderr
    patch_status(cli, "runs.rq.davidlangworthy.io", "watched-1", {"phase": "Failed"})
    failed = cli("watch", "watched-1", "-n", NS, ok=False)
    assert failed.returncode == 3
    patch_status(cli, "runs.rq.davidlangworthy.io", "watched-1", {"phase": "Completed"})
    assert cli("watch", "watched-1", "-n", NS).returncode == 0
    cli("cancel", "watched-1", "-n", NS, "--yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unreachable_kubeconfig(cli: Cli, where: Path) -> Path:
    config = yaml.safe_load(cli.kube.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    path = where / "unreachable.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_connection_errors_are_kubectls(cli: Cli, tmp_path: Path) -> None:
    bad = unreachable_kubeconfig(cli, tmp_path)
    server = yaml.safe_load(bad.read_text())["clusters"][0]["cluster"]["server"]
    done = cli("list", "--kubeconfig", str(bad), ok=False)
    assert done.returncode == 1
    assert done.stderr == (
        f"error: The connection to the server {server.removeprefix('https://')} was refused - "
        "did you specify the right host or port?\n"
    )
    missing = cli("list", "--kubeconfig", str(tmp_path / "nope"), ok=False)
    assert missing.stderr == f"error: stat {tmp_path / 'nope'}: no such file or directory\n"
    env = {**cli.env, "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    done = subprocess.run(
        [str(cli.kube.bin_dir / "kubectl"), "runs", "list"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: no configuration has been provided:")
    assert len(done.stderr.splitlines()) == 1
    timeout = cli("list", "--request-timeout", "soon", ok=False)
    assert timeout.returncode == 1 and "--request-timeout 'soon'" in timeout.stderr


def test_the_kubeconfig_wins_over_in_cluster(cli: Cli) -> None:
    """In a pod (KUBERNETES_SERVICE_HOST set) with a kubeconfig, kubectl uses the file for the
    server and the namespace alike; so do we."""
    env = {**cli.env, "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    done = subprocess.run(
        [str(cli.kube.bin_dir / "kubectl"), "runs", "list", "-o", "name", "-n", NS],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "runs.rq.davidlangworthy.io/alpha-1" in done.stdout


def test_kubectl_completes_run_names_namespaces_and_contexts(cli: Cli, tmp_path: Path) -> None:
    helper = tmp_path / "kubectl_complete-runs"
    helper.write_text('#!/bin/sh\nexec kubectl-runs __complete "$@"\n')
    helper.chmod(0o755)
    env = {**cli.env, "PATH": f"{tmp_path}{os.pathsep}{cli.env['PATH']}"}

    def complete(*words: str) -> list[str]:
        done = subprocess.run(
            [str(cli.kube.bin_dir / "kubectl"), "__complete", "runs", *words],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return [line for line in done.stdout.splitlines() if not line.startswith(":")]

    assert complete("plan", "-n", NS, "al") == ["alpha-1", "alpha-2"]
    assert complete("cancel", "-n", NS, "alpha-1", "b") == ["beta-1"]
    assert complete("-n", "jobtree-cli-dai") == [NS, OTHER]
    contexts = yaml.safe_load(cli.kube.kubeconfig.read_text())["contexts"]
    assert complete("list", "--context", "") == sorted(c["name"] for c in contexts)
    assert complete("li") == ["list"]


def _on_a_terminal(cli: Cli, args: list[str], answer: str) -> tuple[int, str]:
    """Run `kubectl runs ARGS` with stdin/stdout on a pseudo-terminal, answer the question."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [str(cli.kube.bin_dir / "kubectl"), "runs", *args],
        stdin=secondary, stdout=secondary, stderr=secondary, env=cli.env, close_fds=True,
    )  # fmt: skip
    os.close(secondary)
    seen = b""
    while b"[y/N]" not in seen:
        ready, _, _ = select.select([primary], [], [], 30)
        assert ready, seen
        seen += os.read(primary, 4096)
    os.write(primary, answer.encode() + b"\n")
    code = proc.wait(30)
    with contextlib.suppress(OSError):
        while chunk := os.read(primary, 4096):
            seen += chunk
    os.close(primary)
    return code, seen.decode(errors="replace")


def test_cancel_asks_on_a_terminal(cli: Cli) -> None:
    apply(cli, run_manifest("asked-1"))
    code, text = _on_a_terminal(cli, ["cancel", "asked-1", "-n", NS], "n")
    assert code == 1 and f"{NS}/asked-1 (Pending)" in text and "cancelled nothing" in text
    assert cli.kube.kubectl("get", "run", "asked-1", "-n", NS, check=False).returncode == 0
    code, text = _on_a_terminal(cli, ["cancel", "asked-1", "-n", NS], "y")
    assert code == 0 and "runs.rq.davidlangworthy.io/asked-1 deleted" in text
    assert cli.kube.kubectl("get", "run", "asked-1", "-n", NS, check=False).returncode != 0


def test_watch_exits_4_when_the_run_is_deleted(cli: Cli) -> None:
    apply(cli, run_manifest("gone-1"))
    proc = subprocess.Popen(
        [str(cli.kube.bin_dir / "kubectl"), "runs", "watch", "gone-1", "-n", NS, "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env,
    )  # fmt: skip
    assert proc.stdout is not None
    while "(all)" not in (line := proc.stdout.readline()):  # the snapshot is printed
        assert line, proc.stderr.read() if proc.stderr else ""
    cli("cancel", "gone-1", "-n", NS, "--yes")
    assert proc.wait(60) == 4


def test_every_command_takes_kubectls_output_flags(cli: Cli) -> None:
    assert cli("plan", "alpha-2", "-n", NS, "-o", "jsonpath={.phase}").stdout == "Reserved"
    # what -o name prints is a RUN argument (kubectl runs list -o name | xargs -n1 …)
    named = cli("plan", "runs.rq.davidlangworthy.io/alpha-2", "-n", NS, "-o", "jsonpath={.run}")
    assert named.stdout == f"{NS}/alpha-2"
    assert cli("plan", "alpha-2", "-n", NS, "-o", "name").stdout.strip() == (
        "runs.rq.davidlangworthy.io/alpha-2"
    )
    pods = cli("pods", "alpha-1", "-n", NS, "-o", "name").stdout.split()
    assert pods == ["pod/alpha-1-g0-r0"]
    assert "NAME" not in cli("pods", "alpha-1", "-n", NS, "--no-headers").stdout
    done = cli("list", "-n", NS, "--request-timeout", "10s", "-o", "name")
    assert "runs.rq.davidlangworthy.io/alpha-1" in done.stdout


def test_version_and_owners_read_the_service_deployments(cli: Cli) -> None:
    """A chart-style combined Deployment (no controllers run here: 0 ready)."""
    labels = {"app.kubernetes.io/part-of": "jobtree", "app.kubernetes.io/version": "0.1.0"}
    selector = {"app.kubernetes.io/component": "controller-manager"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "jobtree-cm", "namespace": OTHER, "labels": labels},
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {
                    "containers": [
                        {
                            "name": "admission",
                            "image": "ghcr.io/davidlangworthy/jobtree:0.1.0",
                            "command": ["jobtree-admission"],
                            "args": ["--default-owner-globs=lab:*,org:ml"],
                        },
                        {
                            "name": "binder",
                            "image": "ghcr.io/davidlangworthy/jobtree:0.1.0",
                            "command": ["jobtree-binder"],
                        },
                    ]
                },
            },
        },
    }
    apply(cli, deployment)
    try:
        services = cli.json("version")["services"]
        assert [(s["service"], s["deployment"], s["version"]) for s in services] == [
            ("admission", f"{OTHER}/jobtree-cm", "0.1.0"),
            ("binder", f"{OTHER}/jobtree-cm", "0.1.0"),
        ]
        assert "admission  " in cli("version").stdout
        record = cli.json("owners", "-n", OTHER)  # no annotation: the Deployment's default
        assert record["globs"] == ["lab:*", "org:ml"]
        assert record["source"] == (
            f"no annotation: the default owner globs of admission Deployment {OTHER}/jobtree-cm"
        )
    finally:
        cli.kube.kubectl("delete", "deployment", "jobtree-cm", "-n", OTHER, check=False)
