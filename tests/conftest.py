"""Session-wide real servers shared by the service tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.localenv.natsserver import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(workdir=tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
