"""Connecting to the API server and the one raw-REST transport every other module uses.

kubernetes_asyncio supplies configuration loading (kubeconfig, in-cluster service account, token
refresh) and its aiohttp session; the typed, generated API classes are not used. Requests go
through ``ApiClient.call_api`` with ``_preload_content=False``, so this module sees the raw
aiohttp response, decodes JSON itself and turns every failure into one typed :class:`KubeError`.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client import ApiClient

Query = Sequence[tuple[str, str | int]]
JSON = "application/json"
APPLY_PATCH = "application/apply-patch+yaml"
DEFAULT_TIMEOUT = 30.0
_IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"


class KubeError(Exception):
    """A failed API call: HTTP status (0 when the server was not reached), reason, message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")

    @classmethod
    def from_response(cls, status: int, raw: bytes) -> KubeError:
        """Decode a ``Status`` body when there is one; fall back to the raw text."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("kind") == "Status":
            return cls(status, str(body.get("reason") or ""), str(body.get("message") or ""))
        return cls(status, "", raw.decode(errors="replace")[:2000])


async def make_client(
    kubeconfig: str | None = None, context: str | None = None, *, in_cluster: bool = False
) -> ApiClient:
    """An ApiClient for ``kubeconfig`` (else ``$KUBECONFIG``), else in-cluster, else ~/.kube.

    ``in_cluster`` forces the service account (a caller that already chose, like the CLI).
    ``insecure-skip-tls-verify`` in the kubeconfig is honoured by the loader (the local test
    control plane uses a self-signed serving certificate).
    """
    cfg = k8s.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if in_cluster or (not path and os.environ.get(_IN_CLUSTER_ENV)):
        k8s_config.load_incluster_config(client_configuration=cfg)
    else:
        path = path or str(Path.home() / ".kube" / "config")
        await k8s_config.load_kube_config(
            config_file=path, context=context, client_configuration=cfg
        )
    api = ApiClient(configuration=cfg)
    if not urllib.request.getproxies():
        # kubernetes_asyncio's session trusts the environment, so aiohttp looks up proxy
        # variables and parses ~/.netrc on every request (a tenth of a busy service's CPU).
        # Without proxy variables there is nothing to find; a kubeconfig proxy-url still applies.
        api.rest_client.pool_manager._trust_env = False
    return api


async def _send(
    api: ApiClient,
    method: str,
    path: str,
    *,
    query: Query,
    body: Any,
    content_type: str,
    timeout: float | aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """One HTTP exchange; the caller reads and releases the response."""
    try:
        response = await api.call_api(
            path,
            method,
            query_params=list(query),
            header_params={"Accept": JSON, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise KubeError(0, "Unavailable", f"{method} {path}: {exc!r}") from exc
    return cast(aiohttp.ClientResponse, response)


async def request(
    api: ApiClient,
    method: str,
    path: str,
    *,
    query: Query = (),
    body: Any = None,
    content_type: str = JSON,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """A JSON request; the decoded body, or KubeError for any non-2xx answer or lost server."""
    response = await _send(
        api, method, path, query=query, body=body, content_type=content_type, timeout=timeout
    )
    try:
        async with response:
            raw = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise KubeError(0, "Unavailable", f"{method} {path}: {exc!r}") from exc
    if not 200 <= response.status < 300:
        raise KubeError.from_response(response.status, raw)
    if not raw:
        return {}
    decoded = json.loads(raw)
    if not isinstance(decoded, dict):
        raise KubeError(response.status, "BadResponse", f"{method} {path}: not a JSON object")
    return decoded


async def open_stream(
    api: ApiClient, path: str, *, query: Query, timeout: aiohttp.ClientTimeout
) -> aiohttp.ClientResponse:
    """A streaming GET (watch) that answered 2xx; the caller reads it and closes it."""
    response = await _send(
        api, "GET", path, query=query, body=None, content_type=JSON, timeout=timeout
    )
    if not 200 <= response.status < 300:
        async with response:
            raw = await response.read()
        raise KubeError.from_response(response.status, raw)
    return response
