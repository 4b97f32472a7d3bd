"""One real etcd + kube-apiserver (+ KWOK) per test session, shared by every kube test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.localenv.controlplane import ControlPlane, ensure_binaries


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(workdir=tmp_path_factory.mktemp("controlplane"), bin_dir=ensure_binaries())
    try:
        plane.start()
        plane.start_kwok()
        yield plane
    finally:
        plane.stop()
