"""Fixtures for the deployment assets: the real helm and promtool, built on first use by
``hack/testbin.sh helm promtool`` (pinned versions, cached next to the control-plane binaries)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "gpu-fleet"
KUSTOMIZE = REPO / "deploy" / "kustomize"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "observability.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yaml"
SERVICES = ("admission", "packer", "forecast", "resolver", "binder")


@pytest.fixture(scope="session")
def deploy_bin() -> Path:
    """Directory holding ``helm`` and ``promtool`` (built from the Go module proxy once)."""
    done = subprocess.run(
        ["bash", str(REPO / "hack" / "testbin.sh"), "helm", "promtool"],
        check=True,
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    bin_dir = Path(done.stdout.strip().splitlines()[-1])
    for tool in ("helm", "promtool"):
        assert (bin_dir / tool).exists(), f"testbin did not provide {tool}"
    return bin_dir


def run(
    argv: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run a real tool; on failure the assertion shows its stderr."""
    done = subprocess.run(
        [str(a) for a in argv],
        input=input,
        text=True,
        capture_output=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {done.returncode}\n"
            f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
        )
    return done


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a multi-document stream."""
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def console_scripts() -> set[str]:
    """``[project.scripts]`` of pyproject.toml."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return set(data["project"]["scripts"])
