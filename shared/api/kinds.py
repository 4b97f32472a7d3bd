"""The four Jobtree kinds and manifest loading by ``kind``.

Services, the CLI and tests receive manifests without knowing their kind in advance; one registry
keeps the dispatch (and the CRD generator's list of kinds) in a single place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from shared.api.base import API_VERSION
from shared.api.budget import Budget
from shared.api.errors import ApiValidationError
from shared.api.lease import Lease
from shared.api.reservation import Reservation
from shared.api.run import Run

JobtreeObject = Budget | Run | Reservation | Lease
KINDS: tuple[type[JobtreeObject], ...] = (Budget, Run, Reservation, Lease)
_BY_KIND: dict[str, type[JobtreeObject]] = {k.__name__: k for k in KINDS}


def parse_object(data: Mapping[str, Any]) -> JobtreeObject:
    """Validate one manifest of any Jobtree kind (chosen by ``apiVersion`` and ``kind``)."""
    kind = data.get("kind")
    if data.get("apiVersion") != API_VERSION or kind not in _BY_KIND:
        raise ApiValidationError(
            [f"apiVersion/kind: expected {API_VERSION} and one of {', '.join(_BY_KIND)}"]
        )
    return _BY_KIND[kind].parse(data)


def load_manifests(text: str) -> Iterator[JobtreeObject]:
    """Every document of a (multi-document) YAML or JSON text, validated."""
    for doc in yaml.safe_load_all(text):
        if doc is not None:
            yield parse_object(doc)


def load_file(path: Path) -> list[JobtreeObject]:
    return list(load_manifests(path.read_text()))
