"""Which cluster and namespace a command means, the way kubectl decides them.

The connection: ``--kubeconfig``, else the files of ``$KUBECONFIG`` that exist, else
``~/.kube/config`` when it exists; only without any of them, in a pod, the service account
(in-cluster). The namespace follows the same source: ``-n`` wins; otherwise the namespace of the
kubeconfig context in use (``--context``, else the ``current-context`` of the first kubeconfig
file that sets one); in-cluster, the service account's namespace; else ``default``.
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


class ConfigError(Exception):
    """No usable connection configuration (kubectl's wording where it has one)."""


def client_kubeconfig(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """The kubeconfig the client loads (paths joined for a merge), or None for in-cluster.

    A kubeconfig file wins over the service account, for the client as for the namespace.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"stat {explicit}: no such file or directory")
        return str(path)
    found = [p for p in kubeconfig_paths(None, environ) if p.is_file()]
    if found:
        return os.pathsep.join(str(p) for p in found)
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    listed = environ.get("KUBECONFIG")
    where = f"$KUBECONFIG ({listed})" if listed else "~/.kube/config"
    raise ConfigError(
        f"no configuration has been provided: {where} does not exist and this is not a pod "
        "with a service account; set KUBECONFIG or pass --kubeconfig"
    )


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
