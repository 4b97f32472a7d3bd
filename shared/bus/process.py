"""The process entry every Kubernetes-facing service (packer, forecast, resolver, binder) shares.

``python -m services.<name>`` parses its flags, configures logs and tracing, then runs
:func:`serve_service`: one API client, one :class:`ServiceRuntime`, the service started and served
until SIGTERM/SIGINT (also while it is still starting), then stopped. A service only says how it is
built and what its exit status is::

    def main(argv: list[str] | None = None) -> None:
        run_main("packer", parse_args, serve, argv)

    async def serve(cfg: ServiceConfig, options: PackerOptions) -> int:
        await serve_service(cfg, lambda runtime, api: Packer(runtime, api, options))
        log.info("packer stopped")
        return 0

Not imported by ``shared.bus`` itself: it needs the Kubernetes client, the bus does not.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn, Protocol, TypeVar

from kubernetes_asyncio.client import ApiClient

from shared.bus.config import ServiceConfig
from shared.bus.logs import configure_logging
from shared.bus.runtime import ServiceRuntime
from shared.bus.tracing import configure_tracing
from shared.kube.client import make_client

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServiceT = TypeVar("ServiceT", bound=Service)
OptionsT = TypeVar("OptionsT")


async def serve_until_signal(
    start: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], Awaitable[None]],
    *,
    until: Sequence[asyncio.Event] = (),
) -> None:
    """Start a service and run it until SIGTERM/SIGINT or one of ``until`` is set (also while it
    is still starting); stop it in every case. A failed start is raised after the stop."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    waits = [asyncio.create_task(event.wait()) for event in (stopping, *until)]
    starting: asyncio.Task[None] = asyncio.create_task(start())
    try:
        await asyncio.wait([starting, *waits], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (starting, *waits):
            task.cancel()
        await asyncio.gather(starting, *waits, return_exceptions=True)
        await stop()
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


async def serve_service(
    cfg: ServiceConfig,
    make_service: Callable[[ServiceRuntime, ApiClient], ServiceT],
    *,
    until: Callable[[ServiceT], Sequence[asyncio.Event]] | None = None,
) -> ServiceT:
    """Build the service on a fresh API client and runtime, serve it with
    :func:`serve_until_signal` (also ending when an event of ``until(service)`` is set), close
    the client; the stopped service is returned for the exit status."""
    api = await make_client(cfg.kubeconfig)
    service = make_service(ServiceRuntime.from_config(cfg), api)
    events = () if until is None else until(service)
    try:
        await serve_until_signal(service.start, service.stop, until=events)
    finally:
        await api.close()
    return service


def run_main(
    name: str,
    parse_args: Callable[[list[str] | None], tuple[ServiceConfig, OptionsT]],
    serve: Callable[[ServiceConfig, OptionsT], Coroutine[Any, Any, int]],
    argv: list[str] | None = None,
) -> NoReturn:
    """Console entry of ``jobtree-<name>``: flags, logs, tracing, then ``serve``'s exit status."""
    cfg, options = parse_args(argv)
    configure_logging(cfg.log_level, cfg.log_format, service=name)
    configure_tracing(f"jobtree-{name}", cfg.otlp_endpoint)
    sys.exit(asyncio.run(serve(cfg, options)))
