"""Session-wide real servers: one nats-server and one etcd + kube-apiserver + KWOK per session.

Fixtures start lazily, so a run of pure unit tests starts nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.localenv.controlplane import ControlPlane, ensure_binaries
from shared.localenv.natsserver import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(workdir=tmp_path_factory.mktemp("nats"))
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
