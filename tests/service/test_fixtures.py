"""The service-test fixtures themselves: seed-labelled KWOK nodes become Ready."""

from __future__ import annotations

from shared.localenv.controlplane import ControlPlane
from shared.localenv.fleet import SEED_FLEET

from . import helpers as h


def test_seed_labelled_nodes_become_ready(crds: ControlPlane) -> None:
    prefix, labels = SEED_FLEET[0]
    names = h.add_nodes(crds, f"fx-{prefix}", 2, **labels)
    node = h.get_json(crds, "node", names[0])
    assert node["metadata"]["labels"]["fabric.domain"] == "nv-a"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    crds.kubectl("delete", "node", *names, "--wait=false")
