"""The pure parts of the CLI shell: kubeconfig choice, flags, DIR expansion, exit codes,
completion of cluster names (which kubectl command is asked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kubectl_runs import commands, completion, lookup
from services.kubectl_runs.cli import build_parser
from services.kubectl_runs.config import ConfigError, client_kubeconfig


def test_a_kubeconfig_file_wins_over_in_cluster(tmp_path: Path) -> None:
    home = tmp_path / ".kube"
    home.mkdir()
    (home / "config").write_text("{}")
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("{}")
    assert client_kubeconfig(None, {**pod, "KUBECONFIG": f"{a}:{b}"}) == str(a)
    b.write_text("{}")
    assert client_kubeconfig(None, {**pod, "KUBECONFIG": f"{a}:{b}"}) == f"{a}:{b}"
    assert client_kubeconfig(None, {**pod, "KUBECONFIG": str(tmp_path / "none")}) is None
    with pytest.raises(ConfigError, match="stat /nope: no such file"):
        client_kubeconfig("/nope", pod)
    with pytest.raises(ConfigError, match="no configuration has been provided"):
        client_kubeconfig(None, {"KUBECONFIG": str(tmp_path / "none")})


def test_request_timeout_and_table_width() -> None:
    assert commands.request_timeout("0") == commands.DEFAULT_TIMEOUT
    assert commands.request_timeout("5") == 5
    assert commands.request_timeout("2m") == 120
    assert commands.request_timeout("1.5s") == 1.5
    for bad in ("soon", "-1s", ""):
        with pytest.raises(commands.CliError, match="--request-timeout"):
            commands.request_timeout(bad)
    assert commands.table_width({}, terminal=False) == commands.UNLIMITED
    assert commands.table_width({"COLUMNS": "100"}, terminal=False) == 100


def test_manifest_paths_expand_directories(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.yaml", "a.json", "notes.txt", "sub/c.yml"):
        (tmp_path / name).write_text("{}")
    top = [str(tmp_path / "a.json"), str(tmp_path / "b.yaml")]
    assert commands.manifest_paths([str(tmp_path)], recursive=False) == top
    assert commands.manifest_paths([str(tmp_path)], recursive=True) == [
        *top,
        str(tmp_path / "sub/c.yml"),
    ]
    assert commands.manifest_paths(["-", "x.yaml"], recursive=False) == ["-", "x.yaml"]
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "d.yaml").write_text("{}")
    with pytest.raises(commands.CliError, match="-R looks in its subdirectories"):
        commands.manifest_paths([str(tmp_path / "deep")], recursive=False)
    assert commands.manifest_paths([str(tmp_path / "deep")], recursive=True) == [
        str(tmp_path / "deep" / "er" / "d.yaml")
    ]


def test_watch_exit_codes() -> None:
    assert commands.watch_exit({"status": {"phase": "Completed"}}, deleted=False) == 0
    assert commands.watch_exit({"status": {"phase": "Failed"}}, deleted=False) == 3
    assert commands.watch_exit({}, deleted=True) == 4
    assert commands.EXIT_WATCH_TIMEOUT == 5


def test_names_for_dash_o_name() -> None:
    assert commands.default_names({"run": "research/x"}) == ["runs.rq.davidlangworthy.io/x"]
    assert commands.default_names({"owner": "a"}) == []


def test_completion_asks_the_cluster_for_runs_namespaces_and_contexts() -> None:
    tree = completion.command_tree(build_parser())
    assert completion.dynamic(tree, ["plan", ""]) == "runs"
    assert completion.dynamic(tree, ["plan", "x", ""]) is None  # one RUN only
    assert completion.dynamic(tree, ["cancel", "a", "b", ""]) == "runs"  # RUN…
    assert completion.dynamic(tree, ["-n", ""]) == "namespaces"
    assert completion.dynamic(tree, ["list", "--context", "k"]) == "contexts"
    assert completion.dynamic(tree, ["list", ""]) is None
    assert completion.dynamic(tree, ["plan", "--"]) is None
    flags = completion.connection_flags(tree, ["-n", "team", "plan", "--context=c", "-A"])
    assert flags == ["-n=team", "--context=c", "--all-namespaces"]
    runs = lookup.command("runs", flags, "kubectl")
    assert runs[:3] == ["kubectl", "get", "runs.rq.davidlangworthy.io"]
    assert "-n=team" in runs and "--request-timeout=2s" in runs
    assert "-n=team" not in lookup.command("namespaces", flags)
    assert lookup.command("contexts", ["--kubeconfig=k", "--context=c"]) == [
        "kubectl", "config", "get-contexts", "-o", "name", "--kubeconfig=k",
    ]  # fmt: skip
    assert lookup.names("runs", [], {"PATH": ""}) == []  # no kubectl: no names, no error
