"""Structured log fields never collide with LogRecord's own attributes.

``logging`` raises KeyError at the call site when ``extra`` names a LogRecord attribute (such as
``created`` or ``name``), which turns a log line into a failed request. This scans every
``extra={...}`` literal in the services and the shared library.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESERVED = set(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))) | {
    "message",
    "asctime",
}


def extra_keys() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted([*REPO.glob("services/**/*.py"), *REPO.glob("shared/**/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "extra" and isinstance(kw.value, ast.Dict):
                    for key in kw.value.keys:
                        if isinstance(key, ast.Constant) and isinstance(key.value, str):
                            found.append((str(path.relative_to(REPO)), node.lineno, key.value))
    return found


def test_the_scan_sees_the_services_log_calls() -> None:
    assert len(extra_keys()) > 20


def test_no_extra_field_overwrites_a_log_record_attribute() -> None:
    clashes = [
        f"{path}:{line} extra key {key!r}" for path, line, key in extra_keys() if key in RESERVED
    ]
    assert clashes == []
