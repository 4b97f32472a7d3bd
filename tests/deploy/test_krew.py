"""The krew plugin of `kubectl runs`: hack/krew_archive.py rebuilds the archive byte for byte,
the manifest pins its real sha256 and the pyproject version, and an install done the way krew
does it (checksum, `files`, `bin` on PATH) gives a `kubectl runs` the real kubectl runs."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import venv
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from shared.localenv.controlplane import ensure_binaries
from tests.deploy.conftest import REPO, run

PLUGIN = REPO / "plugins" / "krew"
SCRIPT = REPO / "hack" / "krew_archive.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("krew_archive", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("krew_archive", module)  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def manifest() -> dict[str, Any]:
    data = yaml.safe_load((PLUGIN / "runs.yaml").read_text())
    assert isinstance(data, dict)
    return data


def platform() -> dict[str, Any]:
    (only,) = manifest()["spec"]["platforms"]
    assert isinstance(only, dict)
    return only


def version() -> str:
    value = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(value, str)
    return value


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive as `python3 hack/krew_archive.py --check` builds it (fails if stale)."""
    out = tmp_path_factory.mktemp("krew")
    done = run([sys.executable, SCRIPT, "--check", "--out", out], check=False)
    assert done.returncode == 0, f"plugins/krew/runs.yaml is stale: make krew\n{done.stderr}"
    path = out / f"kubectl-runs-v{version()}.tar.gz"
    assert path.is_file()
    return path


def test_manifest_pins_the_rebuilt_archive(archive: Path) -> None:
    sha = platform()["sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", sha)
    assert sha != "0" * 64
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == sha
    # and a second build in this process is the same bytes
    assert load_script().archive_bytes() == archive.read_bytes()


def test_archive_is_deterministic(archive: Path) -> None:
    data = archive.read_bytes()
    assert data[:3] == b"\x1f\x8b\x08"
    assert data[3] == 0, "gzip header flags: no file name, no comment"
    assert data[4:8] == b"\0\0\0\0", "gzip mtime must be 0"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data)), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert {m.name for m in members} == {"kubectl-runs", "README.md"}
        for m in members:
            assert m.isreg()
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
            assert m.mode == (0o755 if m.name == "kubectl-runs" else 0o644)
            extracted = tar.extractfile(m)
            assert extracted is not None
            assert extracted.read() == (PLUGIN / m.name).read_bytes()


def test_manifest_agrees_with_pyproject() -> None:
    ver = version()
    spec = manifest()["spec"]
    assert manifest()["metadata"]["name"] == "runs"
    assert spec["version"] == f"v{ver}"
    assert platform()["uri"] == (
        "https://github.com/davidlangworthy/jobtree/releases/download/"
        f"v{ver}/kubectl-runs-v{ver}.tar.gz"
    )
    source = f"https://github.com/davidlangworthy/jobtree/archive/refs/tags/v{ver}.tar.gz"
    assert f"pip install {source}" in spec["caveats"]
    assert f"pip install {source}" in (PLUGIN / "README.md").read_text()
    launcher = (PLUGIN / "kubectl-runs").read_text()
    assert f'WANT = "{ver}"' in launcher
    assert f"(Jobtree {ver})" in launcher


def test_the_script_detects_and_fixes_a_stale_manifest(tmp_path: Path) -> None:
    """On a copy of the sources: a changed launcher makes --check fail; a plain run re-pins."""
    tree = tmp_path / "repo"
    (tree / "hack").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "hack")
    shutil.copy(REPO / "pyproject.toml", tree)
    shutil.copytree(PLUGIN, tree / "plugins" / "krew")
    launcher = tree / "plugins" / "krew" / "kubectl-runs"
    launcher.write_text(launcher.read_text() + "# changed\n")
    script = tree / "hack" / "krew_archive.py"
    stale = run([sys.executable, script, "--check"], check=False)
    assert stale.returncode == 1
    assert "does not match the archive" in stale.stderr
    run([sys.executable, script])
    fixed = yaml.safe_load((tree / "plugins" / "krew" / "runs.yaml").read_text())
    built = tree / "dist" / "krew" / f"kubectl-runs-v{version()}.tar.gz"
    (entry,) = fixed["spec"]["platforms"]
    assert entry["sha256"] == hashlib.sha256(built.read_bytes()).hexdigest()
    assert entry["sha256"] != platform()["sha256"]
    assert run([sys.executable, script, "--check"], check=False).returncode == 0
    # comments and layout survive the rewrite: only the three pinned lines differ
    before = (PLUGIN / "runs.yaml").read_text().splitlines()
    after = (tree / "plugins" / "krew" / "runs.yaml").read_text().splitlines()
    changed = [b for b, a in zip(before, after, strict=True) if a != b]
    assert changed == [f"      sha256: {platform()['sha256']}"]


def krew_install(archive: Path, root: Path) -> Path:
    """What `kubectl krew install --manifest=runs.yaml --archive=ARCHIVE` does: verify the
    sha256, unpack, copy `files`, link `bin` into krew's bin directory. Returns that directory."""
    entry = platform()
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == entry["sha256"]
    staging, store, bin_dir = root / "staging", root / "store" / "runs", root / "bin"
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    for spec in entry["files"]:
        matches = list(staging.glob(spec["from"]))
        assert matches, spec
        for match in matches:
            target = store / spec["to"] / match.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(match, target)
    binary = store / entry["bin"]
    assert os.access(binary, os.X_OK), "krew requires an executable bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl-runs").symlink_to(binary)
    return bin_dir


def test_krew_style_install_runs_under_kubectl(archive: Path, tmp_path: Path) -> None:
    bin_dir = krew_install(archive, tmp_path / "krew")
    kubectl = ensure_binaries() / "kubectl"
    # PATH without the venv: kubectl must find the plugin only through krew's bin directory
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "JOBTREE_PYTHON": sys.executable,
    }

    def kubectl_run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kubectl), *args],
            env={**env, **extra},
            cwd=tmp_path,  # not the checkout: the launcher must not import from the cwd
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = kubectl_run("plugin", "list")
    assert str(bin_dir / "kubectl-runs") in listed.stdout, listed.stdout + listed.stderr
    done = kubectl_run("runs", "completions", "bash")
    assert done.returncode == 0, done.stderr
    assert "complete -F _kubectl_runs kubectl-runs" in done.stdout
    done = kubectl_run("runs", "--help")
    assert done.returncode == 0 and "usage: kubectl runs" in done.stdout

    # an interpreter without the package: a clear error naming the pip install, not a traceback
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    done = kubectl_run("runs", "--help", JOBTREE_PYTHON=str(bare / "bin" / "python"))
    assert done.returncode == 1
    assert "the jobtree package is not usable" in done.stderr
    source = f"https://github.com/davidlangworthy/jobtree/archive/refs/tags/v{version()}.tar.gz"
    assert f"-m pip install {source}" in done.stderr
    assert "Traceback" not in done.stderr
    done = kubectl_run("runs", "--help", JOBTREE_PYTHON="no-such-python")
    assert done.returncode == 127 and "JOBTREE_PYTHON" in done.stderr
