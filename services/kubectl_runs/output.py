"""kubectl's ``-o`` formats on the CLI's records (pure; imported by the parser, so kept light).

``table`` and ``wide`` are laid out by ``render``; ``json``/``yaml`` dump the record;
``name`` prints ``resource/name`` lines; ``jsonpath=TEMPLATE`` and ``custom-columns=SPEC``
evaluate kubectl's JSONPath subset on the record as its ``-o json`` shows it: fields
(``.a.b``, ``['a.b']``), indexes and slices (``[0]``, ``[1:3]``, ``[-1]``), wildcards (``[*]``,
``.*``), recursive descent (``..name``), ``{range …}{end}``, quoted literals and ``\\n``/``\\t``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

PLAIN = ("table", "wide", "json", "yaml", "name")
TEMPLATES = ("jsonpath=", "custom-columns=")
NONE = "<none>"


class OutputError(ValueError):
    """A bad ``-o`` value or template; the message names the part that is wrong."""


class Formats(tuple[str, ...]):
    """``-o`` choices for argparse and completion: the plain names, and any template value."""

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        return value in PLAIN or any(value.startswith(t) and value != t for t in TEMPLATES)


FORMATS = Formats((*PLAIN, *TEMPLATES))


class Output(NamedTuple):
    """A parsed ``-o`` value: its kind and, for templates, the template text."""

    kind: str
    template: str = ""

    @classmethod
    def parse(cls, value: str) -> Output:
        for prefix in TEMPLATES:
            if value.startswith(prefix):
                return cls(prefix[:-1], value[len(prefix) :])
        if value not in PLAIN:
            raise OutputError(f"-o {value!r}: one of {', '.join(FORMATS)}…")
        return cls(value)

    @property
    def tabular(self) -> bool:
        """Laid out for people by the command's own table."""
        return self.kind in ("table", "wide")


# ---------------------------------------------------------------------------- JSONPath

_STEP = re.compile(
    r"""\.\.(?P<deep>[A-Za-z0-9_\-]+|\*)     # ..name, ..*
      | \.(?P<field>[A-Za-z0-9_\-]+|\*)       # .name, .*
      | \[(?P<bracket>[^\]]*)\]               # [0], [*], [1:2], ['a.b']
    """,
    re.VERBOSE,
)


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, list):
        return list(node)
    return []


def _descend(node: Any) -> Iterator[Any]:
    yield node
    for child in _children(node):
        yield from _descend(child)


def _index(nodes: list[Any], inside: str) -> list[Any]:
    inside = inside.strip()
    if inside == "*":
        return [c for n in nodes for c in _children(n)]
    if inside[:1] in "'\"" and inside[-1:] == inside[:1] and len(inside) >= 2:
        key = inside[1:-1]
        return [n[key] for n in nodes if isinstance(n, dict) and key in n]
    if inside.startswith("?"):
        raise OutputError(f"JSONPath filter [{inside}] is not supported")
    try:
        if ":" in inside:
            parts = [int(p) if p.strip() else None for p in inside.split(":")]
            if len(parts) > 3:
                raise ValueError(inside)
            window = slice(*parts)
            return [c for n in nodes if isinstance(n, list) for c in n[window]]
        at = int(inside)
    except ValueError as exc:
        raise OutputError(f"JSONPath index [{inside}] is not a number, slice or '*'") from exc
    return [n[at] for n in nodes if isinstance(n, list) and -len(n) <= at < len(n)]


def evaluate(path: str, data: Any) -> list[Any]:
    """Every value ``path`` (``.a.b[*]``, ``@``, ``$``) selects in ``data``."""
    text = path.strip()
    if text[:1] in "@$":
        text = text[1:]
    if text in ("", "."):
        return [data]
    nodes, pos = [data], 0
    while pos < len(text):
        step = _STEP.match(text, pos)
        if step is None:
            raise OutputError(f"JSONPath {path!r}: cannot read from {text[pos:]!r}")
        pos = step.end()
        if step["deep"] is not None:
            found = [d for n in nodes for d in _descend(n)]
            name = step["deep"]
            nodes = (
                [c for n in found for c in _children(n)]
                if name == "*"
                else [n[name] for n in found if isinstance(n, dict) and name in n]
            )
        elif step["field"] is not None:
            name = step["field"]
            if name == "*":
                nodes = [c for n in nodes for c in _children(n)]
            else:
                nodes = [n[name] for n in nodes if isinstance(n, dict) and name in n]
        else:
            nodes = _index(nodes, step["bracket"])
    return nodes


def text_of(value: Any) -> str:
    """How kubectl prints one selected value: strings bare, nothing for null, the rest as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _blocks(template: str) -> list[tuple[str, str]]:
    """(``text``|``expr``, content) pieces of a template."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(template):
        start = template.find("{", pos)
        if start < 0:
            out.append(("text", template[pos:]))
            break
        if start > pos:
            out.append(("text", template[pos:start]))
        end = template.find("}", start)
        if end < 0:
            raise OutputError(f"JSONPath template {template!r}: unclosed '{{'")
        out.append(("expr", template[start + 1 : end].strip()))
        pos = end + 1
    return out


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def _render(pieces: Sequence[tuple[str, str]], data: Any, nested: bool = True) -> tuple[str, int]:
    """Render ``pieces`` against ``data`` until an unmatched ``end``; (text, pieces consumed)."""
    out: list[str] = []
    i = 0
    while i < len(pieces):
        kind, content = pieces[i]
        i += 1
        if kind == "text":
            out.append(_unescape(content))
        elif content == "end":
            if not nested:
                raise OutputError("JSONPath {end} without a {range …}")
            return "".join(out), i
        elif content.startswith("range "):
            body = pieces[i:]
            used = _render(body, None)[1] if body else 0
            if not used or body[used - 1] != ("expr", "end"):
                raise OutputError("JSONPath {range …} without a matching {end}")
            for item in evaluate(content[len("range ") :], data):
                out.append(_render(body, item)[0])
            i += used
        elif content[:1] in "'\"" and content[-1:] == content[:1] and len(content) >= 2:
            out.append(_unescape(content[1:-1]))
        else:
            out.append(" ".join(text_of(v) for v in evaluate(content, data)))
    return "".join(out), i


def jsonpath(template: str, data: Any) -> str:
    """``-o jsonpath=TEMPLATE``: the template with each ``{…}`` replaced by what it selects."""
    if "{" not in template:
        template = "{" + template + "}"
    return _render(_blocks(template), data, nested=False)[0]


def custom_columns(spec: str, rows: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    """``-o custom-columns=NAME:.path,…``: headers and one row of cells per record."""
    columns: list[tuple[str, str]] = []
    for part in spec.split(","):
        header, sep, path = part.partition(":")
        if not sep or not header.strip() or not path.strip():
            raise OutputError(f"custom-columns {part!r}: expected HEADER:JSONPATH")
        path = path.strip()
        if path.startswith("{") and path.endswith("}"):
            path = path[1:-1]
        columns.append((header.strip(), path))
    body = []
    for row in rows:
        cells = []
        for _, path in columns:
            found = [v for v in evaluate(path, row) if v is not None]
            cells.append(",".join(text_of(v) for v in found) if found else NONE)
        body.append(cells)
    return [h for h, _ in columns], body
