"""Shared fixtures for service tests: the real control plane with CRDs, real NATS, KWOK nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.localenv.controlplane import ControlPlane
from shared.localenv.fleet import fleet_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds(kube: ControlPlane) -> ControlPlane:
    """The control plane with Jobtree's CRDs installed and established."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.kubectl(
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=jobtree",
        timeout=90,
    )
    return kube


@pytest.fixture(scope="module")
def namespace(crds: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test module (never deleted: there is no namespace controller)."""
    name = "t-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:50]
    crds.kubectl("create", "namespace", name, check=False)
    yield name


def add_nodes(kube: ControlPlane, prefix: str, count: int, **labels: str) -> list[str]:
    """KWOK-managed fake GPU nodes; returns their names once Ready."""
    manifest = fleet_manifest(prefix, count, labels)
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    names = [item["metadata"]["name"] for item in manifest["items"]]
    kube.kubectl(
        "wait", "--for=condition=Ready", "--timeout=60s", *(f"node/{n}" for n in names), timeout=90
    )
    return names
