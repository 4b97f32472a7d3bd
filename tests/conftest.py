"""Session-wide real servers: one nats-server and one etcd + kube-apiserver + KWOK per session.

Fixtures start lazily, so a run of pure unit tests starts nothing.

The nats-server runs the authorization ``shared.bus.auth`` renders: services under test connect
as their own identity (``nats_server.credentials("binder")``) and get exactly its permissions.
Test drivers that play several peers at once (send a commit, watch the ledger) connect as
``TESTER``, a user that exists only in the tests' server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.bus.auth import Permissions
from shared.localenv.controlplane import ControlPlane, ensure_binaries
from shared.localenv.natsserver import NatsServer

REPO = Path(__file__).resolve().parents[1]

TESTER = "tester"
"""The tests' own driver identity (never rendered for a deployment)."""
TESTER_PERMISSIONS = Permissions(publish=(">",), subscribe=(">",), allow_responses=True)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(workdir=tmp_path_factory.mktemp("nats"), extra={TESTER: TESTER_PERMISSIONS})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(workdir=tmp_path_factory.mktemp("controlplane"), bin_dir=ensure_binaries())
    try:
        plane.start()
        plane.start_kwok()
        yield plane
    finally:
        plane.stop()


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


def ensure_namespace(kube: ControlPlane, name: str) -> None:
    """Create a namespace if absent (namespaces are never deleted: no namespace controller)."""
    kube.kubectl(
        "apply", "-f", "-", input=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"
    )
