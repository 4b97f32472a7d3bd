"""Build the krew archive of `kubectl runs` reproducibly and pin it in plugins/krew/runs.yaml.

    python3 hack/krew_archive.py            # dist/krew/kubectl-runs-v<version>.tar.gz + manifest
    python3 hack/krew_archive.py --check    # build, but fail if the manifest is out of date
    make krew                               # the first form

The archive holds the files of ``ARCHIVE_FILES`` from plugins/krew/, at its top level, with fixed
metadata (mtime 0, uid/gid 0, no owner names, modes 0755/0644, sorted, ustar) inside a gzip
stream without a name or timestamp, so the same sources give the same bytes on any machine with
the same zlib. The version comes from pyproject.toml; the manifest's ``version``, ``uri`` and
``sha256`` are rewritten to match the archive (the uri is the GitHub release asset the archive
must be uploaded as). Standard library only, Python >= 3.11.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "krew"
MANIFEST = PLUGIN / "runs.yaml"
DEFAULT_OUT = REPO / "dist" / "krew"
RELEASES = "https://github.com/davidlangworthy/jobtree/releases/download"
# name in the archive -> executable?
ARCHIVE_FILES: dict[str, bool] = {"kubectl-runs": True, "README.md": False}


@dataclass(frozen=True)
class Archive:
    path: Path
    version: str
    """``v`` + pyproject's version, as krew wants it."""
    sha256: str
    uri: str


def project_version(repo: Path = REPO) -> str:
    data = tomllib.loads((repo / "pyproject.toml").read_text())
    version = data["project"]["version"]
    assert isinstance(version, str)
    return version


def archive_name(version: str) -> str:
    return f"kubectl-runs-v{version}.tar.gz"


def archive_bytes(plugin_dir: Path = PLUGIN) -> bytes:
    """The deterministic tar.gz of ``ARCHIVE_FILES``."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(ARCHIVE_FILES):
            data = (plugin_dir / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o755 if ARCHIVE_FILES[name] else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(tar_buffer.getvalue())
    return out.getvalue()


def build(out_dir: Path = DEFAULT_OUT, plugin_dir: Path = PLUGIN, repo: Path = REPO) -> Archive:
    """Write the archive into ``out_dir`` and describe it."""
    version = project_version(repo)
    data = archive_bytes(plugin_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / archive_name(version)
    path.write_bytes(data)
    return Archive(
        path=path,
        version=f"v{version}",
        sha256=hashlib.sha256(data).hexdigest(),
        uri=f"{RELEASES}/v{version}/{archive_name(version)}",
    )


_FIELDS = {
    "version": re.compile(r"^(  version: ).*$", re.MULTILINE),
    "uri": re.compile(r"^(      uri: ).*$", re.MULTILINE),
    "sha256": re.compile(r"^(      sha256: ).*$", re.MULTILINE),
}


def pinned(manifest_text: str, archive: Archive) -> str:
    """``manifest_text`` with its version, uri and sha256 set to ``archive``'s (comments and
    layout kept; the manifest has one platform)."""
    values = {"version": archive.version, "uri": archive.uri, "sha256": archive.sha256}
    text = manifest_text
    for field, pattern in _FIELDS.items():
        value = values[field]

        def replace(match: re.Match[str], value: str = value) -> str:
            return match.group(1) + value

        text, count = pattern.subn(replace, text)
        if count != 1:
            raise ValueError(f"{MANIFEST.name}: expected one `{field}:` line, found {count}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="archive directory")
    parser.add_argument(
        "--check", action="store_true", help="do not rewrite the manifest; fail if it is stale"
    )
    args = parser.parse_args(argv)
    archive = build(args.out)
    current = MANIFEST.read_text()
    wanted = pinned(current, archive)
    print(f"{archive.path} sha256 {archive.sha256}")
    if wanted == current:
        print(f"{MANIFEST.relative_to(REPO)} is up to date")
        return 0
    if args.check:
        print(
            f"{MANIFEST.relative_to(REPO)} does not match the archive: run hack/krew_archive.py",
            file=sys.stderr,
        )
        return 1
    MANIFEST.write_text(wanted)
    print(f"{MANIFEST.relative_to(REPO)} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
