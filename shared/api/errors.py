"""Validation errors rendered with Kubernetes-style field paths.

pydantic reports locations as tuples (``('spec', 'envelopes', 0, 'maxGPUHours')``); users know
the ``kubectl`` spelling (``spec.envelopes[0].maxGPUHours``). Rendering both the same way means a
message from the CLI or a service reads like the one the API server would have given.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from shared.api.rules import INVARIANT


def join_path(base: str, field: str) -> str:
    """``base`` + ``field`` with a dot unless the field is an index."""
    if not base:
        return field
    if not field:
        return base
    return base + field if field.startswith("[") else f"{base}.{field}"


def render_loc(loc: Sequence[int | str]) -> str:
    """``('spec', 'envelopes', 0, 'name')`` -> ``spec.envelopes[0].name``."""
    path = ""
    for part in loc:
        path = join_path(path, f"[{part}]" if isinstance(part, int) else part)
    return path


def render(error: ErrorDetails) -> str:
    """One line naming the offending field path first."""
    path = render_loc(error["loc"])
    ctx = error.get("ctx") or {}
    if error["type"] == INVARIANT and ctx.get("field"):
        return f"{join_path(path, ctx['field'])} {ctx['message']}{ctx['extra']}"
    return f"{path}: {error['msg']}" if path else error["msg"]


class ApiValidationError(ValueError):
    """A manifest failed validation; ``issues`` holds one rendered line per problem."""

    def __init__(self, issues: Sequence[str], kind: str = "object") -> None:
        self.issues = tuple(issues)
        self.kind = kind
        super().__init__(f"invalid {kind}: " + "; ".join(self.issues))

    @classmethod
    def from_pydantic(cls, exc: ValidationError, kind: str) -> ApiValidationError:
        return cls([render(e) for e in exc.errors(include_url=False)], kind)
