"""Base classes shared by every Jobtree API model.

The public field names are camelCase and spell GPU in capitals (``totalGPUs``, ``maxGPUHours``);
Python code uses snake_case. One alias generator maps between them so no field needs a
hand-written alias, and one validator runs each model's declared invariants (see ``rules``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.config import JsonDict

from shared.api.errors import ApiValidationError
from shared.api.rules import Rule, add_cel

GROUP = "rq.davidlangworthy.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "jobtree"


def camel_alias(name: str) -> str:
    """snake_case -> the public camelCase spelling (``max_gpu_hours`` -> ``maxGPUHours``)."""
    head, *rest = name.split("_")
    return head + "".join("GPU" + p[3:] if p.startswith("gpu") else p.capitalize() for p in rest)


def _schema_extra(schema: JsonDict, cls: type[Any]) -> None:
    """Emit each model's invariants as CEL next to its JSON schema."""
    add_cel(schema, getattr(cls, "invariants", ()))


class ApiModel(BaseModel):
    """Common config: camelCase aliases, attribute docstrings as schema descriptions."""

    model_config = ConfigDict(
        alias_generator=camel_alias,
        populate_by_name=True,
        use_attribute_docstrings=True,
        json_schema_extra=_schema_extra,
    )

    invariants: ClassVar[tuple[Rule, ...]] = ()
    """Cross-field rules; each is checked here and emitted as CEL into the CRD."""

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        for rule in type(self).invariants:
            rule.check(self)
        return self

    def dump(self) -> dict[str, Any]:
        """The manifest form: public names, JSON types, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SpecModel(ApiModel):
    """Desired state written by people: unknown fields are mistakes, so they are rejected."""

    model_config = ConfigDict(extra="forbid")


class StatusModel(ApiModel):
    """Observed state written by controllers: tolerate fields a newer controller may add."""

    model_config = ConfigDict(extra="ignore")


class ObjectMeta(BaseModel):
    """The subset of Kubernetes ObjectMeta Jobtree reads; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=camel_alias, populate_by_name=True, extra="allow")

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    finalizers: list[str] | None = None
    owner_references: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class PrinterColumn:
    """One ``kubectl get`` column (``additionalPrinterColumns``)."""

    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True, slots=True)
class CrdInfo:
    """How a kind is served: names, scope and ``kubectl get`` columns."""

    plural: str
    scope: Literal["Cluster", "Namespaced"]
    short_names: tuple[str, ...]
    columns: tuple[PrinterColumn, ...]


class KubeObject(SpecModel):
    """A whole Jobtree object as stored by the API server."""

    crd: ClassVar[CrdInfo]

    api_version: Literal["rq.davidlangworthy.io/v1"] = "rq.davidlangworthy.io/v1"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Validate a manifest, raising :class:`ApiValidationError` with field-path messages."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ApiValidationError.from_pydantic(exc, cls.__name__) from exc
