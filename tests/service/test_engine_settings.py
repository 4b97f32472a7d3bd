"""The services started with non-default engine settings, as a Deployment would start them (one
environment block for all): the binder's commit re-check applies them too.

The envelope allows 100 GPU-hours; an 8-GPU Run without ``maxDuration`` is priced at the default
expected duration. With the default of 24 h that is 192 GPU-hours, and the binder refuses its
commit; with ``JOBTREE_DEFAULT_DURATION_HOURS=10`` given to admission, packer and binder alike it
is 80, admission proposes the bind and the binder commits it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.bus import COMMIT, CommitReply
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import NatsServer

from . import helpers as h

pytestmark = [pytest.mark.kube, pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

OWNER = "settingstest:team"
"""Its own family root: no other module's Budget funds it."""
REGION = "set-r"
LABELS = {"region": REGION, "cluster": "set-c", "fabric.domain": "set-f"}
DOMAIN = (REGION, "set-c", "set-f")
BUDGET = "set-budget"
GPU_HOURS = 100
READY_TIMEOUT = 90.0
"""Service processes start slowly on a loaded machine."""
ENGINE_ENV = {"JOBTREE_DEFAULT_DURATION_HOURS": "10"}
"""The one environment block every service gets (Helm ``engine:``, Kustomize ``jobtree-engine``)."""


@pytest.fixture(scope="module")
def fleet(crds: ControlPlane) -> list[str]:
    """Two 8-GPU KWOK nodes and a Budget of 16 GPUs at once and 100 GPU-hours."""
    names = h.add_nodes(crds, "set", 2, **LABELS, **{"gpu.flavor": h.FLAVOR})
    budget = h.budget_manifest(BUDGET, OWNER, REGION, 16)
    budget["spec"]["envelopes"][0]["maxGPUHours"] = GPU_HOURS
    h.apply(crds, budget)
    return names


async def _commit(nats: NatsServer, run: dict[str, Any], node: str) -> CommitReply:
    intent = h.bind_intent(run, [(node, 8)], envelope=f"{BUDGET}/main", owner=OWNER, domain=DOMAIN)
    async with h.bus_client(nats, "settings-test-client") as client:
        reply: CommitReply = await client.request(COMMIT, h.commit_request(run, intent), timeout=30)
    return reply


async def test_the_binder_prices_gpu_hours_with_the_settings_every_service_was_given(
    crds: ControlPlane, nats_server: NatsServer, namespace: str, fleet: list[str], tmp_path: Path
) -> None:
    # Defaults: the binder refuses the commit (192 GPU-hours > 100).
    direct = h.create_run(crds, namespace, "direct", OWNER, 8, region=REGION)
    log = tmp_path / "binder-defaults.log"
    binder, port = h.spawn_service("binder", crds, nats_server, log)
    try:
        await h.wait_ready(binder, port, log, timeout=READY_TIMEOUT)
        reply = await _commit(nats_server, direct, fleet[0])
        assert not reply.ok
        assert reply.conflict == (
            f"EnvelopeGPUHours: envelope {BUDGET}/main allows 100 GPU-hours, 0 used or promised; "
            "the commit adds 192"
        ), reply.conflict
        assert await h.terminate(binder) == 0, log.read_text()
    finally:
        h.kill(binder)
    assert h.lease_items(crds, namespace, "direct") == []
    crds.kubectl("delete", h.RUNS, "-n", namespace, "direct", "--wait=true")

    # The same environment for admission, packer and binder: the Run is admitted and committed.
    # (The namespace speaks for the owner before admission starts, so its first look admits.)
    crds.kubectl("annotate", "--overwrite", "namespace", namespace, f"{h.GROUP}/owners={OWNER}")
    procs = {
        name: h.spawn_service(name, crds, nats_server, tmp_path / f"{name}.log", env=ENGINE_ENV)
        for name in ("binder", "packer", "admission")
    }
    try:
        for name, (proc, port) in procs.items():
            await h.wait_ready(proc, port, tmp_path / f"{name}.log", timeout=READY_TIMEOUT)
        h.create_run(crds, namespace, "admitted", OWNER, 8, region=REGION)

        def bound() -> list[dict[str, Any]]:
            leases = h.lease_items(crds, namespace, "admitted")
            assert len(leases) == 1, leases
            return leases

        (lease,) = await h.eventually(bound, timeout=120)
        assert lease["spec"]["slice"]["gpus"] == 8
        assert lease["spec"].get("paidByEnvelope") == "main"
        for name, (proc, _) in procs.items():
            assert await h.terminate(proc) == 0, (tmp_path / f"{name}.log").read_text()
    finally:
        h.kill(*(proc for proc, _ in procs.values()))
