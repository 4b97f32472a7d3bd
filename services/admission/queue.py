"""A keyed work queue: each key is processed by at most one worker at a time.

Adding a key that is already waiting merges the two requests; adding one that is being processed
marks it to run again right after. This is the controller-runtime work-queue contract, which is
what "one reconcile per Run at a time" needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys with a ``refresh`` flag (OR-ed when merged); ``get``/``done`` bracket processing."""

    def __init__(self) -> None:
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._waiting: dict[K, bool] = {}
        self._active: set[K] = set()
        self._again: dict[K, bool] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, key: K, *, refresh: bool = False) -> None:
        """Queue ``key`` (merged with a waiting or in-flight request for it)."""
        if key in self._active:
            self._again[key] = self._again.get(key, False) or refresh
            return
        if key in self._waiting:
            self._waiting[key] = self._waiting[key] or refresh
            return
        self._waiting[key] = refresh
        self._ready.put_nowait(key)

    def add_after(self, key: K, delay: float, *, refresh: bool = False) -> None:
        """Queue ``key`` after ``delay`` seconds."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.add(key, refresh=refresh)

        handle = loop.call_later(max(0.0, delay), fire)
        self._timers.add(handle)

    async def get(self) -> tuple[K, bool]:
        """The next key and its refresh flag; the caller must call :meth:`done` after."""
        key = await self._ready.get()
        refresh = self._waiting.pop(key)
        self._active.add(key)
        return key, refresh

    def done(self, key: K) -> None:
        """Processing of ``key`` finished; re-queue it if it was added meanwhile."""
        self._active.discard(key)
        if key in self._again:
            self.add(key, refresh=self._again.pop(key))

    def close(self) -> None:
        """Cancel delayed additions."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
