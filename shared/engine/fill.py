"""Opportunistic fill — an opportunistic Run placed inside other Runs' spare GPUs (SPEC §3).

A spare holds physical GPUs that idle until a swap needs them. An opportunistic Run may run its
ranks there with ``Borrowed`` leases, paid by its own envelopes like any lease, and reclaimable at
any moment: a swap onto the spare ends the fill ``ReclaimedBySpare`` (``failures``), dropping the
spare ends the fill riding on it (``resolver``).

Fill reuses ``pack`` unchanged: ``fill_topology`` shrinks every node to its unfilled spare room,
pack places the Run there as usual (groups, domains, payers' selectors, ranks), and ``as_fill``
relabels the ranks ``Borrowed``. Fill never holds spares of its own: a spare inside a spare would
protect nothing. Because fill lives inside spare GPUs, a node's physical occupancy is
active + max(spare, borrowed) (``topology.occupancy``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from shared.engine.model import Lease, Role, RunKey
from shared.engine.pack import GroupPlacement, Placement
from shared.engine.topology import PodChange, Topology


def spare_room(leases: Iterable[Lease], run: RunKey) -> dict[str, int]:
    """Node → spare GPUs ``run`` may fill there: open spares of *other* runs minus open fill.

    A Run never fills its own spares (a swap would take them back from its own ranks). Nodes
    without room are left out.
    """
    room: dict[str, int] = {}
    for lease in leases:
        if not lease.open:
            continue
        if lease.role is Role.SPARE and lease.run != run:
            room[lease.node] = room.get(lease.node, 0) + lease.gpus
        elif lease.role is Role.BORROWED:
            room[lease.node] = room.get(lease.node, 0) - lease.gpus
    return {node: gpus for node, gpus in sorted(room.items()) if gpus > 0}


def fill_topology(topology: Topology, leases: Iterable[Lease], run: RunKey) -> Topology:
    """The nodes of ``topology`` holding spare room for ``run``, each as big as that room.

    Nodes the topology does not know are skipped; unschedulable ones stay (pack skips them).
    The nodes keep their pods' CPU, memory and pod slots (a fill rank is a pod like any other);
    their GPUs are not subtracted again: spare room is room inside GPUs leases already hold.
    """
    nodes = []
    pods: list[PodChange] = []
    for name, gpus in spare_room(leases, run).items():
        node = topology.node(name)
        if node is not None:
            nodes.append(dataclasses.replace(node, gpus=gpus))
            pods.extend(
                (key, name, (0, u[1], u[2], u[3])) for key, u in topology.pods_on(name).items()
            )
    return Topology.build(nodes, pods=pods)


def as_fill(placement: Placement) -> Placement:
    """The placement with its ranks ``Borrowed``: the fill form of a pack on ``fill_topology``."""
    return Placement(
        groups=tuple(
            GroupPlacement(
                group.index,
                group.domain,
                tuple(
                    dataclasses.replace(s, role=Role.BORROWED) if s.role is Role.ACTIVE else s
                    for s in group.slices
                ),
            )
            for group in placement.groups
        )
    )


def is_fill(placement: Placement) -> bool:
    """Every slice of the placement rides in spares (``Borrowed``): it holds no spare itself."""
    return bool(placement.groups) and all(s.role is Role.BORROWED for s in placement.slices)
