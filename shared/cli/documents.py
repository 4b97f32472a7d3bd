"""Reading manifests a user hands ``kubectl runs submit``: YAML or JSON, with bounds.

PyYAML's safe loader shares one object for every alias of an anchor, so a few hundred bytes of
nested aliases ("billion laughs") load instantly and then expand to gigabytes as soon as anything
walks them (validation, JSON encoding). :func:`parse_documents` counts what each document
expands to before building it, and refuses files larger than :data:`MAX_INPUT_BYTES`, so a bad
file costs a one-line error instead of the machine's memory.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_INPUT_BYTES = 4 * 1024 * 1024
"""Larger than any object the API server stores (its request limit is 3 MiB)."""
MAX_NODES = 500_000
"""Scalars, lists and maps one document may expand to, aliases counted every time they appear."""


class DocumentError(ValueError):
    """The input cannot be read as manifests; the message is one line."""


def _expanded(node: yaml.Node, limit: int) -> int:
    """Nodes ``node`` expands to, aliases counted at each use; stops once past ``limit``."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise DocumentError("a YAML alias refers to itself (recursive anchors are refused)")
        active.add(key)
        total = 1
        if isinstance(current, yaml.SequenceNode):
            children: list[yaml.Node] = list(current.value)
        elif isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(node)


def parse_documents(
    text: str, *, max_bytes: int = MAX_INPUT_BYTES, max_nodes: int = MAX_NODES
) -> list[Any]:
    """Every non-empty YAML/JSON document of ``text``; :class:`DocumentError` when it is too
    large, expands (through aliases) past ``max_nodes``, or is not YAML."""
    size = len(text.encode())
    if size > max_bytes:
        raise DocumentError(f"is larger than the limit of {max_bytes} bytes; refused")

    class Bounded(yaml.SafeLoader):
        def construct_document(self, node: yaml.Node) -> Any:
            count = _expanded(node, max_nodes)
            if count > max_nodes:
                raise DocumentError(
                    f"a document expands to more than {max_nodes} YAML nodes "
                    "(nested aliases: an alias bomb?); refused"
                )
            return super().construct_document(node)

    try:
        return [doc for doc in yaml.load_all(text, Loader=Bounded) if doc is not None]
    except yaml.YAMLError as exc:
        raise DocumentError(f"not YAML or JSON: {' '.join(str(exc).split())}") from exc
    except RecursionError as exc:
        raise DocumentError("nested too deeply to read") from exc
