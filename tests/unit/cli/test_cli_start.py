"""`kubectl runs --help` and TAB stay light, and the CLI needs none of the server extra.

Each check runs a fresh interpreter (this test process has imported everything already)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("kubernetes_asyncio", "aiohttp", "pydantic", "yaml", "shared.api", "shared.engine")
SERVER_ONLY = ("nats", "prometheus_client", "opentelemetry", "msgspec", "cryptography")
CLI_MODULES = ("commands", "listing", "cancel", "logs", "owners", "version", "lookup", "render")


def _loaded_after(argv: list[str]) -> list[str]:
    script = (
        "import contextlib, io, json, sys\n"
        "from services.kubectl_runs.cli import run\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        run({argv!r}, {{'PATH': ''}})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["list", "--help"], ["__complete", "plan", "-o", ""], ["__complete", "pl"]],
)
def test_help_and_completion_import_no_client_models_or_engine(argv: list[str]) -> None:
    loaded = _loaded_after(argv)
    heavy = [m for m in loaded if m.startswith(HEAVY)]
    assert heavy == [], f"{argv} imported {heavy[:5]}"


def test_every_command_module_imports_without_the_server_extra() -> None:
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {SERVER_ONLY!r}:\n"
        "            raise ImportError('server extra: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        + "".join(f"import services.kubectl_runs.{m}\n" for m in CLI_MODULES)
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
