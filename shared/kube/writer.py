"""Small async verbs over the API server: get, idempotent create, delete, server-side apply.

Every write a service makes is safe to repeat: create returns the existing object on
AlreadyExists (deterministic names make a re-sent commit a no-op), delete treats NotFound as
done, and status is written with server-side apply under the service's own field manager, so
each status field has exactly one owner (ARCHITECTURE: one writer per object or field).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from kubernetes_asyncio.client import ApiClient

from shared.kube.client import APPLY_PATCH, KubeError, request
from shared.kube.resources import Resource

__all__ = ["KubeError", "apply", "create", "delete", "get", "patch_status"]

Propagation = Literal["Background", "Foreground", "Orphan"]
_ENVELOPE_KEYS = frozenset({"apiVersion", "kind", "metadata", "status"})


def _namespace_of(resource: Resource, body: Mapping[str, Any], namespace: str | None) -> str | None:
    """The explicit namespace, else the body's metadata.namespace; None when cluster-scoped."""
    if not resource.namespaced:
        return None
    value = namespace or (body.get("metadata") or {}).get("namespace")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{resource.plural} are namespaced: give a namespace")
    return value


def _name_of(body: Mapping[str, Any]) -> str:
    name = (body.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("body needs metadata.name")
    return name


async def get(
    api: ApiClient, resource: Resource, name: str, namespace: str | None = None
) -> dict[str, Any] | None:
    """The object, or None when it does not exist."""
    try:
        return await request(api, "GET", resource.path(namespace, name))
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


async def create(
    api: ApiClient, resource: Resource, body: Mapping[str, Any], namespace: str | None = None
) -> dict[str, Any]:
    """Create the object; if it already exists return the existing one unchanged."""
    ns = _namespace_of(resource, body, namespace)
    full = {"apiVersion": resource.api_version, "kind": resource.kind, **body}
    try:
        return await request(api, "POST", resource.path(ns), body=full)
    except KubeError as exc:
        if exc.status != 409:
            raise
    existing = await get(api, resource, _name_of(body), ns)
    if existing is None:  # deleted between the two calls: let the caller retry
        raise KubeError(409, "AlreadyExists", f"{resource.plural}/{_name_of(body)} vanished")
    return existing


async def delete(
    api: ApiClient,
    resource: Resource,
    name: str,
    namespace: str | None = None,
    *,
    propagation: Propagation = "Background",
) -> bool:
    """Delete the object; False when it was already gone."""
    try:
        await request(
            api,
            "DELETE",
            resource.path(namespace, name),
            query=[("propagationPolicy", propagation)],
        )
    except KubeError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def _apply(
    api: ApiClient,
    resource: Resource,
    body: Mapping[str, Any],
    *,
    name: str,
    namespace: str | None,
    field_manager: str,
    subresource: str | None = None,
) -> dict[str, Any]:
    full = {"apiVersion": resource.api_version, "kind": resource.kind, **body}
    return await request(
        api,
        "PATCH",
        resource.path(namespace, name, subresource),
        query=[("fieldManager", field_manager), ("force", "true")],
        body=full,
        content_type=APPLY_PATCH,
    )


async def apply(
    api: ApiClient, resource: Resource, body: Mapping[str, Any], *, field_manager: str
) -> dict[str, Any]:
    """Server-side apply of the whole object (created when missing); the stored result."""
    ns = _namespace_of(resource, body, None)
    return await _apply(
        api, resource, body, name=_name_of(body), namespace=ns, field_manager=field_manager
    )


async def patch_status(
    api: ApiClient,
    resource: Resource,
    name: str,
    body: Mapping[str, Any],
    *,
    namespace: str | None = None,
    field_manager: str,
) -> dict[str, Any]:
    """Server-side apply on the status subresource; the stored object.

    ``body`` is the status content (``{"phase": "Running"}``) or a whole object carrying
    ``status``. The manager owns exactly the fields it sends: a field it sent before and omits
    now is removed, fields of other managers are untouched. 404 when the object does not exist.
    """
    whole = "status" in body and set(body) <= _ENVELOPE_KEYS
    status = body["status"] if whole else dict(body)
    metadata: dict[str, str] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return await _apply(
        api,
        resource,
        {"metadata": metadata, "status": status},
        name=name,
        namespace=namespace,
        field_manager=field_manager,
        subresource="status",
    )
