"""Fleet utilisation: how much of each (flavor, domain) cell is in use, by Jobtree or not.

Operators read it as a gauge pair (allocated / allocatable per flavor and domain); it is derived
from the same topology snapshot the packer places on, so the figure is what placement sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.engine.model import DomainKey
from shared.engine.topology import Topology


@dataclass(frozen=True, slots=True)
class FleetCell:
    """One (flavor, domain): its GPUs and the GPUs in use on them."""

    flavor: str
    domain: DomainKey
    allocatable: int
    """Sum of the nodes' allocatable GPUs (Ready or not, cordoned or not)."""
    allocated: int
    """GPUs held by open leases (active + max(spare, borrowed)) plus those of pods Jobtree did not
    create, capped per node at its allocatable."""


def fleet_cells(topology: Topology) -> tuple[FleetCell, ...]:
    """Every (flavor, domain) of the snapshot, sorted, with its allocatable and held GPUs."""
    cells: list[FleetCell] = []
    for flavor in topology.flavors():
        for domain in sorted(topology.domains(flavor)):
            nodes = topology.nodes_in(flavor, domain)
            cells.append(
                FleetCell(
                    flavor=flavor,
                    domain=domain,
                    allocatable=sum(n.gpus for n in nodes),
                    allocated=sum(
                        min(n.gpus, topology.used(n.name) + topology.load(n.name).gpus)
                        for n in nodes
                    ),
                )
            )
    return tuple(cells)
