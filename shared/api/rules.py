"""Cross-field invariants stated once and enforced twice.

Every rule carries its CEL expression (emitted into the CRD as ``x-kubernetes-validations`` so
``kubectl apply`` rejects bad manifests) and an equivalent Python predicate (run by the pydantic
models so services, the CLI and tests reject the same objects with the same message). Keeping both
in one record is what stops the API server and the code from drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

INVARIANT = "jobtree_invariant"
"""pydantic error type of a violated :class:`Rule`; ``errors.render`` names the field from it."""

CEL_KEY = "x-kubernetes-validations"


def invariant_error(field: str, message: str, extra: str = "") -> PydanticCustomError:
    """An error whose rendered text is ``<path>.<field> <message><extra>``."""
    template = "{field} {message}{extra}" if field else "{message}{extra}"
    return PydanticCustomError(
        INVARIANT, template, {"field": field, "message": message, "extra": extra}
    )


def add_cel(schema: JsonSchemaValue, rules: Iterable[Rule]) -> None:
    """Append the rules' CEL form to a JSON schema node."""
    cel = [rule.to_cel() for rule in rules]
    if cel:
        schema.setdefault(CEL_KEY, []).extend(cel)


@dataclass(frozen=True, slots=True)
class Rule:
    """One invariant: CEL for the API server, a Python predicate for everything else.

    ``field`` is the path, relative to the object the rule sits on, of the field the error is
    about; it becomes the CEL ``fieldPath`` and prefixes the message. ``ok`` is ``None`` for
    transition rules (they need ``oldSelf``, which only the API server has). Used as a class-level
    ``invariants`` entry on a model, or as ``Annotated`` metadata on a single field.
    """

    cel: str
    message: str
    field: str = ""
    ok: Callable[[Any], bool] | None = None
    detail: Callable[[Any], str] | None = None

    @property
    def text(self) -> str:
        return f"{self.field} {self.message}" if self.field else self.message

    def to_cel(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.text}
        if self.field:
            out["fieldPath"] = "." + self.field
        return out

    def check(self, value: Any) -> None:
        """Raise the pydantic error for this rule when ``value`` violates it."""
        if self.ok is None or self.ok(value):
            return
        extra = f" ({self.detail(value)})" if self.detail else ""
        raise invariant_error(self.field, self.message, extra)

    def _validate(self, value: Any) -> Any:
        self.check(value)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        add_cel(out, [self])
        return out


@dataclass(frozen=True, slots=True)
class ListType:
    """``Annotated`` marker for list semantics the API server enforces (duplicates rejected).

    ``key=None`` makes an atomic set of scalars; a key makes a map-list whose items are unique by
    that field (``x-kubernetes-list-map-keys``), which also lets server-side apply merge items.
    """

    key: str | None = None

    def _identity(self, item: Any) -> Any:
        return item if self.key is None else getattr(item, self.key)

    def _validate(self, items: list[Any]) -> list[Any]:
        seen: set[Hashable] = set()
        for index, item in enumerate(items):
            ident = self._identity(item)
            if ident in seen:
                raise invariant_error(f"[{index}]", "duplicate value", f" ({ident!r})")
            seen.add(ident)
        return items

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        if self.key is None:
            out["x-kubernetes-list-type"] = "set"
        else:
            out["x-kubernetes-list-type"] = "map"
            out["x-kubernetes-list-map-keys"] = [self.key]
        return out


AS_SET = ListType()
"""A list of unique scalars."""
