"""CRD generation: checked-in files are fresh, structural, and consistent with the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.api import KINDS
from shared.api.base import KubeObject
from shared.api.crdgen import crd, main, render_all, stale_files

CRDS = Path(__file__).resolve().parents[2] / "crds"
EXPECTED = {
    "Budget": ("budgets", "Cluster"),
    "Run": ("runs", "Namespaced"),
    "Reservation": ("reservations", "Namespaced"),
    "Lease": ("leases", "Cluster"),
}


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    if "items" in schema:
        yield from nodes(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.*")


def openapi(kind: type[KubeObject]) -> dict[str, Any]:
    schema: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_checked_in_crds_match_a_fresh_generation() -> None:
    assert stale_files(CRDS) == [], "run `python -m shared.api.crdgen` and commit crds/"
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == sorted(render_all())


def test_check_flag_exit_codes(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--check"]) == 1
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "runs.yaml").write_text("# edited by hand\n", encoding="utf-8")
    assert main(["--out", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_names_scope_and_subresources(kind: type[KubeObject]) -> None:
    doc = crd(kind)
    plural, scope = EXPECTED[kind.__name__]
    assert doc["metadata"]["name"] == f"{plural}.rq.davidlangworthy.io"
    spec = doc["spec"]
    assert spec["group"] == "rq.davidlangworthy.io"
    assert spec["scope"] == scope
    assert spec["names"]["categories"] == ["jobtree"]
    assert spec["names"]["shortNames"] and "lease" not in spec["names"]["shortNames"]
    [version] = spec["versions"]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_schema_is_structural(kind: type[KubeObject]) -> None:
    text = yaml.safe_dump(openapi(kind))
    for keyword in ("$ref", "anyOf", "allOf", "oneOf", "title", "null", "exclusiveMinimum"):
        assert keyword not in text
    for path, node in nodes(openapi(kind)):
        if path != ".metadata":
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for name in node.get("required", []):
            assert name in node["properties"], f"{path}.{name}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_cel_rules_name_existing_fields_and_strings_are_bounded(kind: type[KubeObject]) -> None:
    """fieldPaths resolve; strings and lists CEL can reach have bounds (the cost estimator)."""
    for path, node in nodes(openapi(kind)):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"]
            target: dict[str, Any] = node
            for part in rule.get("fieldPath", "").split(".")[1:]:
                target = target["properties"][part]
        free_text = node.get("type") == "string" and not {"enum", "format"} & node.keys()
        if free_text and path.startswith((".spec", ".status")):
            assert "maxLength" in node, path
        if node.get("type") == "array" and path.startswith(".spec"):
            assert "maxItems" in node, path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_printer_columns_point_at_schema_fields(kind: type[KubeObject]) -> None:
    schema = openapi(kind)
    columns = crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert columns[-1]["name"] == "Age"
    for column in columns:
        node = schema
        for part in column["jsonPath"].lstrip(".").split("."):
            name = part.removesuffix("[*]")
            if name == "creationTimestamp":
                break
            node = node["properties"][name]
            if part.endswith("[*]"):
                node = node["items"]


def test_defaults_and_special_fields() -> None:
    run = {k.__name__: openapi(k) for k in KINDS}["Run"]["properties"]["spec"]["properties"]
    assert run["locality"]["properties"]["allowCrossGroupSpread"]["default"] is True
    assert run["runtime"]["properties"]["maxRestarts"]["default"] == 0
    assert run["sparesPerGroup"]["default"] == 0
    assert run["template"] == {
        "description": run["template"]["description"],
        "type": "object",
        "x-kubernetes-embedded-resource": False,
        "x-kubernetes-preserve-unknown-fields": True,
    }
    budget = {k.__name__: openapi(k) for k in KINDS}["Budget"]
    envelopes = budget["properties"]["spec"]["properties"]["envelopes"]
    assert envelopes["items"]["properties"]["maxGPUHours"]["type"] == "number"
    assert envelopes["x-kubernetes-list-map-keys"] == ["name"]


def test_immutability_rules() -> None:
    by_name = {k.__name__: openapi(k) for k in KINDS}
    for name in ("Reservation", "Lease"):
        rules = by_name[name]["properties"]["spec"]["x-kubernetes-validations"]
        assert {"rule": "self == oldSelf", "message": "spec is immutable"} in rules
    root_rules = " ".join(r["rule"] for r in by_name["Lease"]["x-kubernetes-validations"])
    assert "oldSelf.status.closed" in root_rules and "oldSelf.status.endTime" in root_rules
