"""The capacity deficit: the fewest GPUs that, freed in scope, would let a blocked Run fit.

One rule for every number a user reads about it (the Reservation's ``deficitGPUs`` and scope,
the remedies, what activation asks the resolver to free):

- A Run free to spread its groups over domains needs its narrowest start (active GPUs plus
  spares) anywhere in scope: the deficit is that demand minus the free GPUs in scope.
- A Run whose groups must share one domain (``allowCrossGroupSpread: false``, or a single group,
  since a group never straddles two domains) needs them in one domain, so free GPUs elsewhere do
  not help: the deficit is counted in its best domain and the scope narrows to that domain, so
  the remedies say what would be cut there and the lottery draws there. The best domain is the
  one with the most free GPUs among those whose nodes could hold the Run once their leases end
  (a domain too small even when emptied is never the answer while another one is not).
- A single group may still spill its spares to another domain when spread is allowed: only its
  active GPUs must be in the domain, its spares anywhere in scope.

Per-node fragmentation is not counted (a blocked pack always lacks at least 1 GPU), so the
deficit is a floor; activation grows it when the cuts do not make the bind pack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shared.engine.cover import cover_demand
from shared.engine.model import DomainKey, RunRequest
from shared.engine.pack import group_sizes
from shared.engine.resolver import Scope
from shared.engine.topology import Topology


@dataclass(frozen=True, slots=True)
class Deficit:
    gpus: int
    """GPUs missing, at least 1 (the Run was refused)."""
    scope: Scope
    """Where they are missing: the given scope, or its best domain for a single-domain Run."""


def floor_width(request: RunRequest) -> int:
    """Active GPUs of the narrowest start the Run accepts."""
    return request.malleable.min_gpus if request.malleable else request.total_gpus


def min_demand(request: RunRequest) -> int:
    """Active GPUs plus spares at the narrowest width the Run may start at."""
    return cover_demand(dataclasses.replace(request, total_gpus=floor_width(request)))


def single_domain(request: RunRequest) -> bool:
    """Must all groups of the Run's narrowest start be placed in one domain?"""
    if not request.allow_cross_group_spread:
        return True
    sizes = group_sizes(request, floor_width(request))
    return sizes is not None and len(sizes) == 1


def _home_demand(request: RunRequest) -> int:
    """GPUs that must be in the chosen domain: everything, or a lone group's actives when its
    spares may spill (spread allowed)."""
    return floor_width(request) if request.allow_cross_group_spread else min_demand(request)


def capacity_deficit(request: RunRequest, topology: Topology, scope: Scope) -> Deficit:
    """GPUs missing in scope for ``request``'s narrowest start (see the module docstring)."""
    need = min_demand(request)
    free: dict[DomainKey, int] = {}
    reach: dict[DomainKey, int] = {}
    nodes: dict[DomainKey, list[str]] = {}
    for name in sorted(scope.nodes or ()):
        node = topology.node(name)
        if node is None:
            continue
        gpus = topology.free(name)
        free[node.domain] = free.get(node.domain, 0) + gpus
        held = topology.used(name) if node.schedulable else 0
        reach[node.domain] = reach.get(node.domain, 0) + gpus + held
        nodes.setdefault(node.domain, []).append(name)
    total = sum(free.values())
    if not free or not single_domain(request):
        return Deficit(max(need - total, 1), scope)
    home = _home_demand(request)
    best = min(free, key=lambda d: (reach[d] < home, -free[d], d))
    gpus = max(home - free[best], need - total, 1)
    label = f"{scope.flavor}@{'/'.join(best)}"
    return Deficit(gpus, Scope(scope.flavor, frozenset(nodes[best]), label))
