"""A tiny HTTP/1.1 server for probes and scraping: ``/healthz``, ``/readyz``, ``/metrics``.

Built on ``asyncio.start_server`` so a service needs no web framework: it runs on the service's own
event loop, which is exactly what liveness should prove — if this answers, the loop is not stuck.
Each connection serves one request and closes (probes and Prometheus are happy with that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)

Readiness = Callable[[], str | None]
"""Returns ``None`` when ready, else the reason it is not (sent in the 503 body)."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_READ_TIMEOUT = 5.0
_MAX_HEADER_LINES = 100


class HealthServer:
    """Serves the probe and metrics endpoints for one service process."""

    def __init__(self, readiness: Readiness, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._readiness = readiness
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when constructed with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(self._route(reader), _READ_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            status, ctype, body = 400, "text/plain; charset=utf-8", b"bad request\n"
        except Exception:  # a probe must never take the process down
            log.exception("health endpoint failed")
            status, ctype, body = 503, "text/plain; charset=utf-8", b"internal error\n"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(ConnectionError):
            writer.write(head + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _route(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        request_line = (await reader.readline()).decode("latin-1").strip()
        for _ in range(_MAX_HEADER_LINES):  # headers are irrelevant here; consume them
            if (await reader.readline()) in (b"\r\n", b"\n", b""):
                break
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise ValueError(f"bad request line {request_line!r}")
        method, target = parts[0], parts[1].split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if target not in ("/healthz", "/readyz", "/metrics"):
            return 404, text, b"not found\n"
        if method != "GET":
            return 405, text, b"method not allowed\n"
        if target == "/healthz":
            return 200, text, b"ok\n"
        if target == "/readyz":
            reason = self._readiness()
            if reason is None:
                return 200, text, b"ready\n"
            return 503, text, f"not ready: {reason}\n".encode()
        return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
