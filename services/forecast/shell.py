"""Process plumbing shared by the forecast and resolver services."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


async def serve_until_signal(
    start: Callable[[], Coroutine[Any, Any, None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start a service and run it until SIGTERM/SIGINT (also while it is still starting)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    starting: asyncio.Task[None] = asyncio.create_task(start())
    waiting = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait([starting, waiting], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await waiting
    finally:
        for task in (starting, waiting):
            task.cancel()
        await asyncio.gather(starting, waiting, return_exceptions=True)
        await stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
