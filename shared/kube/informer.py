"""List+watch of one resource into a local cache, with ordered change callbacks.

Services keep read-only caches of the objects they decide on and rebuild them from a list+watch
after any restart (ARCHITECTURE §2). The contract that matters to them: every change reaches the
listeners exactly as the cache applies it, including changes the watch itself never reported.
When a watch cannot resume (410 Gone: the resourceVersion expired) the informer lists again and
diffs the fresh list against its cache, emitting synthetic ADDED / MODIFIED / DELETED events, so
a listener never misses a delete. A dropped connection resumes from the last resourceVersion
seen (bookmarks keep it fresh), which the server answers with the events in between.

Nothing an object contains may stop the loop: undecodable lines, nameless objects and failing
listeners are logged and skipped.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal

import aiohttp
from kubernetes_asyncio.client import ApiClient

from shared.kube.client import KubeError, Query, open_stream, request
from shared.kube.resources import Resource, object_key

log = logging.getLogger(__name__)

EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Obj = dict[str, Any]
Listener = Callable[[EventType, Obj, Obj | None], Awaitable[None] | None]
"""``(event, obj, old)``: ``old`` is the cached object the event replaces (None for ADDED); for
DELETED ``obj`` is the object's final (or last known) state."""
Change = tuple[EventType, Obj, Obj | None]
Transform = Callable[[Obj], Obj]
"""Reduces each object before it is cached (e.g. a Pod to the few fields capacity needs); the
result must keep ``metadata`` name, namespace, uid and resourceVersion."""


def _version(obj: Mapping[str, Any]) -> str | None:
    value = (obj.get("metadata") or {}).get("resourceVersion")
    return value if isinstance(value, str) else None


def _uid(obj: Mapping[str, Any]) -> str | None:
    value = (obj.get("metadata") or {}).get("uid")
    return value if isinstance(value, str) else None


def diff(old: Mapping[str, Obj], new: Mapping[str, Obj]) -> list[Change]:
    """Events turning cache ``old`` into list ``new``: deletions first, then by key.

    An object replaced under the same name (different uid) is a DELETED then an ADDED, so
    listeners never mistake a new incarnation for an update of the old one.
    """
    changes: list[Change] = [("DELETED", old[k], old[k]) for k in sorted(old.keys() - new.keys())]
    for key in sorted(new):
        obj, prev = new[key], old.get(key)
        if prev is None:
            changes.append(("ADDED", obj, None))
        elif _uid(prev) != _uid(obj):
            changes.append(("DELETED", prev, prev))
            changes.append(("ADDED", obj, None))
        elif _version(prev) != _version(obj):
            changes.append(("MODIFIED", obj, prev))
    return changes


def parse_event(line: bytes) -> tuple[str, Obj] | None:
    """One watch line → (type, object); None (logged) for anything malformed."""
    try:
        event = json.loads(line)
    except ValueError:
        log.warning("watch: undecodable line skipped: %.200r", line)
        return None
    if not isinstance(event, dict):
        log.warning("watch: non-object event skipped: %.200r", line)
        return None
    kind, obj = event.get("type"), event.get("object")
    if not isinstance(kind, str) or not isinstance(obj, dict):
        log.warning("watch: event without type/object skipped: %.200r", line)
        return None
    return kind, obj


class _Expired(Exception):
    """The resourceVersion to resume from is gone: only a relist can resynchronise."""


class Informer:
    """Keeps ``items`` (by ``namespace/name``, or ``name`` when cluster-scoped) in sync.

    ``run()`` loops until ``stop()``; ``ready`` is set after the first complete list. Listeners
    are called in registration order after the cache has applied the change; register them before
    ``run()`` to see the initial list as ADDED events. Stopping keeps the cache and the
    resourceVersion: a later ``run()`` resumes the watch where it left off (or relists when that
    version expired).
    """

    def __init__(
        self,
        api: ApiClient,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        transform: Transform | None = None,
        watch_timeout: int = 300,
        page_size: int = 500,
        min_backoff: float = 0.2,
        max_backoff: float = 10.0,
    ) -> None:
        self.api = api
        self.resource = resource
        self.namespace = namespace if resource.namespaced else None
        self._selectors: list[tuple[str, str | int]] = []
        if label_selector:
            self._selectors.append(("labelSelector", label_selector))
        if field_selector:
            self._selectors.append(("fieldSelector", field_selector))
        self._transform = transform
        self._watch_timeout = watch_timeout
        self._page_size = page_size
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._items: dict[str, Obj] = {}
        self._rv: str | None = None
        self._listeners: list[Listener] = []
        self._stream: aiohttp.ClientResponse | None = None
        self._epoch = 0
        """Bumped by reconnect(): a watch opened under an older epoch is dropped."""
        self._relist_needed = False
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.relists = 0
        """Complete lists done so far (1 after the first sync); more mean resynchronisations."""

    # ------------------------------------------------------------------ public surface

    @property
    def items(self) -> Mapping[str, Obj]:
        """Read-only view of the cache; objects must not be mutated."""
        return MappingProxyType(self._items)

    @property
    def resource_version(self) -> str | None:
        """The last resourceVersion seen (list, event or bookmark); None forces a relist."""
        return self._rv

    def get(self, key: str) -> Obj | None:
        return self._items.get(key)

    def add_listener(self, callback: Listener) -> None:
        self._listeners.append(callback)

    async def run(self) -> None:
        """List, then watch forever with backoff on errors, until ``stop()``."""
        self._stopping.clear()
        loop = asyncio.create_task(self._loop(), name=f"informer-{self.resource.plural}")
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({loop, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (loop, stopper):
                task.cancel()
            await asyncio.gather(loop, stopper, return_exceptions=True)

    def stop(self) -> None:
        """Make ``run()`` return (the cache and resourceVersion are kept)."""
        self._stopping.set()

    def reconnect(self) -> None:
        """Drop the current watch connection; the loop resumes from the last resourceVersion."""
        self._epoch += 1
        if self._stream is not None:
            self._stream.close()

    def resync(self) -> None:
        """Drop the watch and list again; differences reach listeners as events."""
        self._relist_needed = True
        self.reconnect()

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        backoff = self._min_backoff
        while True:
            try:
                if self._rv is None or self._relist_needed:
                    await self._relist()
                elif not await self._watch():
                    await asyncio.sleep(self._min_backoff)  # never spin on empty watches
                backoff = self._min_backoff
            except _Expired:
                log.info("%s: resourceVersion %s expired, relisting", self._what, self._rv)
                self._rv = None
            except Exception as exc:
                log.warning("%s: %r; retrying in %.1fs", self._what, exc, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._max_backoff)

    @property
    def _what(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"informer {self.resource.plural}{where}"

    def _query(self, *extra: tuple[str, str | int]) -> Query:
        return [*extra, *self._selectors]

    def _normalise(self, obj: Obj) -> Obj:
        """List items of core kinds omit apiVersion/kind; fill them so every object is whole.

        ``metadata.managedFields`` is dropped: no decision reads it, and it is often the larger
        part of a Lease or Pod, held for every object of a ledger that only grows."""
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            meta.pop("managedFields", None)
        return obj if self._transform is None else self._transform(obj)

    def _keyed(self, objects: list[Any]) -> Iterator[tuple[str, Obj]]:
        for obj in objects:
            try:
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                yield object_key(obj), self._normalise(obj)
            except ValueError as exc:
                log.warning("%s: malformed object skipped (%s)", self._what, exc)

    async def _list(self) -> tuple[dict[str, Obj], str]:
        """All objects and the list's resourceVersion, page by page."""
        items: dict[str, Obj] = {}
        token: str | None = None
        path = self.resource.path(self.namespace)
        while True:
            query = self._query(
                ("limit", self._page_size), *([("continue", token)] if token else [])
            )
            try:
                page = await request(self.api, "GET", path, query=query, timeout=120)
            except KubeError as exc:
                if exc.status == 410 and token:  # the continue token expired: start over
                    items, token = {}, None
                    continue
                raise
            items.update(self._keyed(page.get("items") or []))
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                version = meta.get("resourceVersion")
                if not isinstance(version, str) or not version:
                    raise KubeError(200, "BadResponse", "list without resourceVersion")
                return items, version

    async def _relist(self) -> None:
        self._relist_needed = False
        fresh, version = await self._list()
        for change in diff(self._items, fresh):
            await self._apply(*change)
        self._rv = version
        self.relists += 1
        self.ready.set()

    async def _watch(self) -> bool:
        """Follow one watch connection to its end; True when it delivered anything."""
        assert self._rv is not None
        epoch = self._epoch
        query = self._query(
            ("watch", "true"),
            ("resourceVersion", self._rv),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", self._watch_timeout),
        )
        timeout = aiohttp.ClientTimeout(connect=15, sock_read=self._watch_timeout + 30)
        try:
            stream = await open_stream(
                self.api, self.resource.path(self.namespace), query=query, timeout=timeout
            )
        except KubeError as exc:
            if exc.status == 410:
                raise _Expired from exc
            raise
        if epoch != self._epoch:  # reconnect() or resync() while connecting
            stream.close()
            return False
        self._stream = stream
        delivered = False
        try:
            async for line in _lines(stream):
                delivered = True
                parsed = parse_event(line)
                if parsed is not None:
                    await self._on_event(*parsed)
        except (aiohttp.ClientError, TimeoutError):
            if epoch == self._epoch:
                raise
        finally:
            self._stream = None
            stream.close()
        return delivered

    async def _on_event(self, kind: str, obj: Obj) -> None:
        if kind == "BOOKMARK":
            self._rv = _version(obj) or self._rv
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired
            raise KubeError(
                int(obj.get("code") or 0), str(obj.get("reason")), str(obj.get("message"))
            )
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: unknown event type %r skipped", self._what, kind)
            return
        try:
            key = object_key(obj)
        except ValueError as exc:
            log.warning("%s: malformed %s event skipped (%s)", self._what, kind, exc)
            return
        obj = self._normalise(obj)
        version = _version(obj)
        prev = self._items.get(key)
        if kind == "DELETED":
            if prev is not None:
                await self._apply("DELETED", obj, prev)
        elif prev is None:
            await self._apply("ADDED", obj, None)
        elif version is None or version != _version(prev):
            await self._apply("MODIFIED", obj, prev)
        if version:
            self._rv = version

    async def _apply(self, kind: EventType, obj: Obj, old: Obj | None) -> None:
        """Update the cache, then tell every listener (a failing listener is only logged)."""
        key = object_key(obj)
        if kind == "DELETED":
            self._items.pop(key, None)
        else:
            self._items[key] = obj
        for callback in self._listeners:
            try:
                result = callback(kind, obj, old)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("%s: listener failed on %s %s", self._what, kind, key)


async def _lines(stream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Newline-terminated lines of a response, whatever their size; a cut-off tail is dropped."""
    buffer = bytearray()
    async for chunk in stream.content.iter_any():
        scanned = len(buffer)
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scanned)) >= 0:
            line = bytes(buffer[start:end])
            start = scanned = end + 1
            if line.strip():
                yield line
        del buffer[:start]
