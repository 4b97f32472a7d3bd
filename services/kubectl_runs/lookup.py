"""Names for completion, asked of the cluster through ``kubectl`` (Run names, namespaces, contexts).

Completion must answer within a keystroke, so it neither imports the API client nor the models:
``kubectl`` already knows the kubeconfig, the context, exec credential plugins and proxies,
and answers in a fraction of the Python client's start-up. Any failure (no kubectl, no cluster,
forbidden, slow) yields no names, never an error in the user's shell.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence

TIMEOUT = 2.0
NAMES = "jsonpath={.items[*].metadata.name}"
QUERIES: Mapping[str, tuple[str, ...]] = {
    "runs": ("get", "runs.rq.davidlangworthy.io", "-o", NAMES),
    "namespaces": ("get", "namespaces", "-o", NAMES),
    "contexts": ("config", "get-contexts", "-o", "name"),
}


def command(wanted: str, flags: Sequence[str], kubectl: str = "kubectl") -> list[str]:
    """The kubectl command line that lists ``wanted`` with the flags of the line completed."""
    keep = [f for f in flags if wanted == "runs" or not f.startswith(("-n=", "--namespace="))]
    if wanted != "runs":
        keep = [f for f in keep if f != "--all-namespaces"]
    if wanted == "contexts":
        keep = [f for f in keep if f.startswith("--kubeconfig=")]
    else:
        keep.append(f"--request-timeout={TIMEOUT:g}s")
    return [kubectl, *QUERIES[wanted], *keep]


def names(wanted: str, flags: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The names kubectl lists (sorted, unique), or none when it cannot."""
    kubectl = shutil.which("kubectl", path=environ.get("PATH"))
    if kubectl is None:
        return []
    try:
        done = subprocess.run(
            command(wanted, flags, kubectl),
            capture_output=True,
            text=True,
            timeout=TIMEOUT + 1,
            env=dict(environ),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return sorted(set(done.stdout.split()))
