"""Bounded manifest reading: aliases are fine until they expand past the limit."""

from __future__ import annotations

import pytest

from shared.cli.documents import DocumentError, parse_documents


def laughs(levels: int, width: int = 9) -> str:
    """Nested aliases: ``width ** levels`` scalars from a few hundred bytes."""
    lines = ["a0: &a0 [" + ",".join(['"lol"'] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_plain_documents_and_modest_aliases_load() -> None:
    text = "kind: A\n---\n---\nbase: &env [{name: X, value: '1'}]\nother: *env\n"
    docs = parse_documents(text)
    assert docs == [
        {"kind": "A"},
        {"base": [{"name": "X", "value": "1"}], "other": [{"name": "X", "value": "1"}]},
    ]
    assert parse_documents(laughs(3))  # 9**3 scalars: fine


def test_an_alias_bomb_is_refused_before_it_is_built() -> None:
    bomb = laughs(9)
    assert len(bomb) < 700
    with pytest.raises(DocumentError, match="expands to more than 500000 YAML nodes"):
        parse_documents(bomb)
    with pytest.raises(DocumentError, match="more than 100 YAML nodes"):
        parse_documents(laughs(3), max_nodes=100)


def test_recursive_aliases_oversized_input_and_bad_yaml() -> None:
    with pytest.raises(DocumentError, match="refers to itself"):
        parse_documents("a: &x [*x]\n")
    with pytest.raises(DocumentError, match="larger than the limit of 10 bytes"):
        parse_documents("a: 12345678901\n", max_bytes=10)
    with pytest.raises(DocumentError, match=r"^not YAML or JSON: ") as info:
        parse_documents("a: [1,\n")
    assert "\n" not in str(info.value)
