"""Attack: a tiny manifest that expands to gigabytes, or a huge one, handed to ``kubectl runs
submit``. The real plugin, under a 512 MiB address-space limit, answers with one line on stderr
before it talks to any API server (the kubeconfig here does not even exist)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.cli.test_documents import laughs

PLUGIN = Path(sys.executable).with_name("kubectl-runs")
LIMIT = 512 * 1024 * 1024


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def submit(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert PLUGIN.exists(), "install the plugin: .venv/bin/pip install -e ."
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "absent-kubeconfig")}
    return subprocess.run(
        [str(PLUGIN), "submit", "-f", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        preexec_fn=_limit_memory,
    )


def run_with(template_yaml: str) -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\nmetadata: {name: bomb}\nspec:\n"
        "  owner: org:ai\n  resources: {gpuType: H100-80GB, totalGPUs: 8}\n  template:\n"
        "    metadata:\n      annotations:\n"
        + "".join(f"        {line}\n" for line in template_yaml.splitlines())
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (run_with(laughs(9)), "expands to more than 500000 YAML nodes"),
        ("a: &x [*x]\n", "a YAML alias refers to itself"),
        ("# padding\n" * 500_000, "is larger than the limit of 4194304 bytes"),
    ],
    ids=["alias-bomb", "recursive-alias", "oversized"],
)
def test_submit_refuses_with_one_line(content: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(content)
    done = submit(path, tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {path}: ") and expected in lines[0]
