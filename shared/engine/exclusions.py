"""Which nodes of a Run's flavor and location take none of its ranks, and why, per domain.

``kubectl runs plan`` shows it so a user can tell a full fleet from nodes the Run cannot use at
all (tainted, cordoned, not selected by its template, CPU or memory taken by other pods). The
reasons are ``shared.engine.capacity.exclusion``, the same rule pack applies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

from shared.engine.capacity import Exclusion, exclusion
from shared.engine.model import DomainKey, RunRequest, selector_matches
from shared.engine.topology import Topology


def excluded_nodes(
    request: RunRequest, topology: Topology
) -> Mapping[DomainKey, tuple[int, Mapping[str, int]]]:
    """Domain → (nodes of the Run's flavor and location there, excluded count per reason).

    A node whose GPUs are all held by pods Jobtree did not create counts as ``GPUS_HELD``;
    nodes busy with Jobtree's own leases are not excluded, only full. Domains with no excluded
    node are left out.
    """
    out: dict[DomainKey, tuple[int, Mapping[str, int]]] = {}
    for domain in sorted(topology.domains(request.flavor)):
        nodes = [
            n
            for n in topology.nodes_in(request.flavor, domain)
            if selector_matches(request.selector, n.labels)
        ]
        reasons: Counter[str] = Counter()
        for node in nodes:
            load = topology.load(node.name)
            why = exclusion(node, load, request.pod)
            if why is None and load.gpus and topology.free(node.name) == 0:
                why = Exclusion.GPUS_HELD
            if why is not None:
                reasons[why.value] += 1
        if reasons:
            out[domain] = (len(nodes), MappingProxyType(dict(sorted(reasons.items()))))
    return MappingProxyType(out)
