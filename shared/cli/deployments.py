"""Which Deployments run Jobtree services, and as which service (pure).

The Helm chart runs one Deployment per service (``mode: split``) or one ``controller-manager``
Deployment with a container per service (``mode: combined``); the Kustomize bases one per
service. What they share is the container's command: ``jobtree-<service>`` (or the image's
entrypoint given the short name). The CLI finds them by the labels both set
(``app.kubernetes.io/part-of=jobtree`` in the chart, ``app.kubernetes.io/name=jobtree`` in
Kustomize) and recognises each service by that command.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from shared.cli import views

Obj = Mapping[str, Any]
SERVICES = ("admission", "packer", "forecast", "resolver", "binder")
SELECTORS = ("app.kubernetes.io/part-of=jobtree", "app.kubernetes.io/name=jobtree")
VERSION_LABEL = "app.kubernetes.io/version"


def command_words(container: Obj) -> list[str]:
    return [
        str(w)
        for w in (*views.as_list(container.get("command")), *views.as_list(container.get("args")))
    ]


def service_of(container: Obj) -> str | None:
    """``admission`` for a container running ``jobtree-admission`` (or the entrypoint with
    ``admission``), else None."""
    words = command_words(container)
    if not words:
        return None
    first = words[0].rsplit("/", 1)[-1]
    if first.startswith("jobtree-") and first[len("jobtree-") :] in SERVICES:
        return first[len("jobtree-") :]
    return first if first in SERVICES else None


def service_containers(deployment: Obj) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(service, container) of every Jobtree service container of a Deployment."""
    template = views.as_map(views.as_map(deployment.get("spec")).get("template"))
    for container in views.as_list(views.as_map(template.get("spec")).get("containers")):
        container = views.as_map(container)
        service = service_of(container)
        if service is not None:
            yield service, container


def service_rows(deployments: Iterable[Obj]) -> list[dict[str, Any]]:
    """One row per Jobtree service container: its Deployment, image, version label, readiness."""
    rows = []
    for deployment in deployments:
        meta = views.as_map(deployment.get("metadata"))
        labels = views.as_map(meta.get("labels"))
        status = views.as_map(deployment.get("status"))
        wanted = views.as_map(deployment.get("spec")).get("replicas", 1)
        for service, container in service_containers(deployment):
            rows.append(
                {
                    "service": service,
                    "deployment": f"{meta.get('namespace')}/{meta.get('name')}",
                    "container": container.get("name"),
                    "image": container.get("image"),
                    "version": labels.get(VERSION_LABEL),
                    "ready": f"{views.as_int(status.get('readyReplicas'))}/{wanted}",
                }
            )
    return sorted(rows, key=lambda r: (SERVICES.index(r["service"]), r["deployment"]))
