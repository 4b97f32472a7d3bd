"""Which namespace a command means, the way kubectl decides it.

``-n`` wins; otherwise the namespace of the kubeconfig context in use (``--context``, else the
``current-context`` of the first kubeconfig file that sets one); in a pod without a kubeconfig,
the service account's namespace; else ``default``. ``KUBECONFIG`` may list several files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

DEFAULT_NAMESPACE = "default"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kubeconfig_paths(explicit: str | None, environ: Mapping[str, str]) -> list[Path]:
    """``--kubeconfig``, else every file of ``$KUBECONFIG``, else ``~/.kube/config``."""
    if explicit:
        return [Path(explicit).expanduser()]
    listed = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        return [Path(p).expanduser() for p in listed]
    return [Path.home() / ".kube" / "config"]


def context_namespace(configs: Sequence[Mapping[str, Any]], context: str | None) -> str | None:
    """The namespace of ``context`` (else the current context) in merged kubeconfig documents.

    Like kubectl's merge, the first file that sets ``current-context`` or defines a context of a
    given name wins. None when the context sets no namespace or cannot be found.
    """
    name = context
    if name is None:
        name = next((c["current-context"] for c in configs if c.get("current-context")), None)
    if not name:
        return None
    for config in configs:
        for entry in config.get("contexts") or ():
            if isinstance(entry, Mapping) and entry.get("name") == name:
                details = entry.get("context") or {}
                namespace = details.get("namespace") if isinstance(details, Mapping) else None
                return namespace if isinstance(namespace, str) and namespace else None
    return None


def default_namespace(
    explicit_kubeconfig: str | None, context: str | None, environ: Mapping[str, str]
) -> str:
    """The namespace a command uses when ``-n`` is not given."""
    paths = [p for p in kubeconfig_paths(explicit_kubeconfig, environ) if p.is_file()]
    if not paths and environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or DEFAULT_NAMESPACE
        except OSError:
            return DEFAULT_NAMESPACE
    configs = []
    for path in paths:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(loaded, Mapping):
            configs.append(loaded)
    return context_namespace(configs, context) or DEFAULT_NAMESPACE
