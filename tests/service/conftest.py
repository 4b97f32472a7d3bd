"""Shared fixtures for service tests: the real control plane with CRDs, real NATS, KWOK nodes.

Plain helpers (kubectl readers, manifests, in-process services) are in ``helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.localenv.controlplane import ControlPlane
from tests.conftest import ensure_namespace


@pytest.fixture(scope="module")
def namespace(crds: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test module (never deleted: there is no namespace controller)."""
    name = "t-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:50]
    ensure_namespace(crds, name)
    yield name
