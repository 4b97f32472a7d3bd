"""Every `kubectl runs …` line the CLI's docs show parses with the real command tree, so a
renamed flag or command cannot leave the quickstart or the reference behind. (Running them is
tests/kube/test_kubectl_runs*.py's job.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from services.kubectl_runs.cli import build_parser

DOCS = Path(__file__).resolve().parents[3] / "docs"
PAGES = ("quickstart-researcher.md", "kubectl-runs.md")
BLOCK = re.compile(r"```(?:bash|console)\n(.*?)```", re.DOTALL)


def commands(page: str) -> list[str]:
    found = []
    for block in BLOCK.findall((DOCS / page).read_text()):
        for line in block.splitlines():
            line = line.removeprefix("$ ").strip()
            if line.startswith("kubectl runs "):
                found.append(line.split(" #")[0].split(" | ")[0].split(" || ")[0].strip())
    return found


@pytest.mark.parametrize("page", PAGES)
def test_every_documented_command_parses(page: str) -> None:
    lines = commands(page)
    assert len(lines) >= 10, page
    parser = build_parser()
    for line in lines:
        words = shlex.split(line)[2:]
        if "--help" in words:
            continue
        args = parser.parse_args(words)
        assert args.handler, line
