"""Shared fixtures for service tests: the real control plane with CRDs, real NATS, KWOK nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from shared.localenv.controlplane import ControlPlane
from shared.localenv.fleet import fleet_manifest
from tests.conftest import ensure_namespace


@pytest.fixture(scope="module")
def namespace(crds: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test module (never deleted: there is no namespace controller)."""
    name = "t-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:50]
    ensure_namespace(crds, name)
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
