"""The invalid-manifest corpus is rejected by the models too, naming the same field.

``tests/kube/test_crds.py`` proves the API server rejects each file; this proves the pydantic
models (used by services and the CLI) agree, so the two validators cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.api import ApiValidationError, parse_object

CORPUS = Path(__file__).resolve().parents[1] / "kube" / "invalid"
FILES = sorted(CORPUS.glob("*.yaml"))


def expectations(path: Path) -> list[str]:
    """``# expect: <substring>`` lines; the first one (the field path) opens the file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# expect: "), f"{path.name} must open with '# expect: '"
    return [line.removeprefix("# expect: ") for line in lines if line.startswith("# expect: ")]


def test_corpus_is_large_and_one_rule_per_file() -> None:
    assert len(FILES) >= 40
    for path in FILES:
        assert len(list(yaml.safe_load_all(path.read_text(encoding="utf-8")))) == 1


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_models_reject_with_the_field_path(path: Path) -> None:
    field = expectations(path)[0]
    with pytest.raises(ApiValidationError) as info:
        parse_object(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert field in str(info.value)
