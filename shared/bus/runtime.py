"""``ServiceRuntime``: the imperative shell every Jobtree service process runs in.

One runtime per service process owns the NATS connection, the ``nats.micro`` service (so replicas
share requests through a queue group and answer ``$SRV.PING/INFO/STATS``), the JetStream streams
for durable events, and the health/metrics HTTP server. Service code only writes typed handlers::

    rt = ServiceRuntime("packer", nats_url=cfg.nats_url)
    rt.endpoint(PLAN, plan)               # async def plan(req: PlanRequest) -> PlanReply
    rt.subscribe(LEDGER, on_ledger, durable="packer")
    await rt.start()
    rt.set_ready(True)                    # once the watch caches are synced
    await rt.run_until_stopped()          # SIGTERM/SIGINT → drain NATS, stop HTTP

The wire contract is enforced here, once: payloads are decoded strictly into the subject's struct;
anything that does not decode goes to ``jobtree.v1.deadletter.<subject>`` with a metric and an
error reply, and handler exceptions become error replies — a bad message never kills a service.

Handlers run one at a time per endpoint or subscription in a process (NATS delivers a
subscription's messages in order); throughput scales with replicas, which share the load.

Every send carries the caller's trace context in the NATS headers (W3C ``traceparent``) and every
handler runs in a SERVER/CONSUMER span that continues it — see ``shared/bus/tracing.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.js import api as js_api
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, ServiceError
from opentelemetry.trace import TracerProvider

from shared.bus import tracing
from shared.bus.config import BusCredentials, ServiceConfig
from shared.bus.health import HealthServer
from shared.bus.messages import DeadLetter, decode, encode
from shared.bus.metrics import (
    DEADLETTER,
    HANDLER_ERRORS,
    HANDLER_SECONDS,
    NATS_CONNECTED,
    NATS_RECONNECTS,
    expose_service,
)
from shared.bus.subjects import (
    DEADLETTER_PREFIX,
    STREAMS,
    StreamSpec,
    Subject,
    consumer_name,
    deadletter_subject,
    inbox_prefix,
    stream_of,
)

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Rep = TypeVar("Rep")

MAX_DELIVERIES = 5
"""A durable event whose handler failed this many times is dead-lettered instead of retried."""
MAX_DEADLETTER_PAYLOAD = 512 * 1024
"""Dead letters keep at most this much of the original payload (base64 must fit max_payload)."""
_FETCH_BATCH = 16
_FETCH_TIMEOUT = 2.0
_ACK_WAIT = 30.0
_DRAIN_TIMEOUT = 10.0
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # nats.micro service names allow no more


_waiting: set[ServiceRuntime] = set()
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _on_signal(sig: signal.Signals) -> None:
    log.info("stopping on %s", sig.name)
    for runtime in list(_waiting):
        runtime._stopped.set()


def _install_signal_handlers() -> bool:
    """Route SIGTERM/SIGINT to every waiting runtime; False where the loop cannot (not the main
    thread, or no signal support), in which case only :meth:`ServiceRuntime.stop` ends the wait."""
    loop = asyncio.get_running_loop()
    try:
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, _on_signal, sig)
    except (NotImplementedError, RuntimeError, ValueError):
        log.debug("cannot install signal handlers here")
        return False
    return True


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.remove_signal_handler(sig)


class BusError(Exception):
    """A request failed: error reply from the service, no responder, timeout or bad reply.

    ``code`` is the remote error code (``"400"`` malformed request, ``"500"`` handler error) or a
    local one (``"408"`` timeout, ``"503"`` no responders, ``"502"`` undecodable reply);
    ``message`` is the remote error text.
    """

    def __init__(self, subject: str, code: str, message: str) -> None:
        super().__init__(f"{subject}: {code} {message}")
        self.subject = subject
        self.code = code
        self.message = message


class Refused(Exception):
    """Raised by a handler to decline a well-formed request with a typed answer: the caller gets
    ``BusError(code, message)`` — not a handler failure, so no traceback and no error count."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class ServiceRuntime:
    """NATS connection, typed endpoints and subscriptions, probes and metrics of one service."""

    def __init__(
        self,
        name: str,
        *,
        nats_url: str,
        version: str = "0.1.0",
        http_host: str = "127.0.0.1",
        http_port: int = 0,
        tracer_provider: TracerProvider | None = None,
        credentials: BusCredentials | None = None,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"service name {name!r} must match {_NAME.pattern}")
        self.name = name
        self.service_name = f"jobtree-{name}"
        self.version = version
        self._nats_url = nats_url
        self._credentials = credentials or BusCredentials()
        self.http = HealthServer(self._readiness, host=http_host, port=http_port)
        self._nc: Any = None
        self._js: Any = None
        self._micro: Any = None
        self._queued: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._live = False  # registrations run immediately once start() drained the queue
        self._started = False
        self._stopping = False
        self._ready = False
        self._problems: list[str] = []
        self._registering: set[asyncio.Task[None]] = set()
        self._pullers: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        """Requests being handled by concurrent endpoints (finished before NATS drains)."""
        self._subs: list[Any] = []
        self._stopped = asyncio.Event()
        # the global provider's tracer: a no-op until configure_tracing() installs one
        self._tracer = tracing.tracer(tracer_provider)

    @classmethod
    def from_config(cls, cfg: ServiceConfig, *, version: str = "0.1.0") -> ServiceRuntime:
        """A runtime for the settings ``service_args`` parsed."""
        return cls(
            cfg.name,
            nats_url=cfg.nats_url,
            version=version,
            http_host=cfg.http_host,
            http_port=cfg.http_port,
            credentials=cfg.credentials,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def nc(self) -> Any:
        """The live ``nats.aio.client.Client`` (for the rare raw need; prefer the typed API)."""
        if self._nc is None:
            raise RuntimeError(f"runtime {self.name} is not started")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    @property
    def http_port(self) -> int:
        return self.http.port

    async def start(self) -> None:
        """Serve probes, connect (retrying forever), ensure streams, register everything queued.

        The HTTP server starts first so ``/healthz`` answers and ``/readyz`` explains the wait
        while NATS is still unreachable.
        """
        if self._started:
            return
        self._started = True
        expose_service(self.name, self.version)
        await self.http.start()
        self._nc = await nats.connect(
            servers=[u.strip() for u in self._nats_url.split(",") if u.strip()],
            name=self.service_name,
            inbox_prefix=inbox_prefix(self.name),
            **self._credentials.connect_options(),
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        NATS_CONNECTED.labels(self.name).set(1)
        self._js = self._nc.jetstream()
        for spec in STREAMS:
            await self._ensure_stream(spec)
        self._micro = await add_service(
            self._nc,
            name=self.service_name,
            version=self.version,
            description=f"Jobtree {self.name} service",
        )
        while self._queued:
            await self._queued.pop(0)()
        await self._nc.flush()  # the server knows every subscription before start() returns
        self._live = True
        log.info(
            "service started",
            extra={"nats": self._nats_url, "http_port": self.http.port, "micro_id": self.micro_id},
        )

    @property
    def micro_id(self) -> str:
        """This instance's ``nats.micro`` id (``$SRV.PING.jobtree-<name>.<id>``)."""
        return str(self._micro.id) if self._micro is not None else ""

    def set_ready(self, ready: bool) -> None:
        """Declare the service's own readiness (e.g. caches synced); ``/readyz`` also needs NATS."""
        self._ready = ready

    async def run_until_stopped(self) -> None:
        """Wait for SIGTERM/SIGINT (or :meth:`stop`), then shut down cleanly.

        Several runtimes in one process (the combined controller-manager) share one signal
        handler, so a single SIGTERM stops all of them.
        """
        _waiting.add(self)
        installed = _install_signal_handlers()
        try:
            await self._stopped.wait()
        finally:
            _waiting.discard(self)
            if installed and not _waiting:
                _remove_signal_handlers()
            await self.stop()

    async def stop(self) -> None:
        """Stop consuming, drain NATS (in-flight replies and publishes go out) and stop HTTP."""
        if self._stopping:
            return
        self._stopping = True
        self._ready = False
        self._stopped.set()
        tasks = [*self._registering, *self._pullers]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._micro is not None:
            with contextlib.suppress(Exception):
                await self._micro.stop()
        if self._handling:
            await asyncio.wait(set(self._handling), timeout=_DRAIN_TIMEOUT)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), _DRAIN_TIMEOUT)
            except Exception as exc:
                log.warning("NATS drain failed (%r), closing", exc)
                with contextlib.suppress(Exception):
                    await self._nc.close()
        await self.http.stop()
        log.info("service stopped")

    def _readiness(self) -> str | None:
        if self._stopping:
            return "stopping"
        if not self.connected:
            return "NATS not connected"
        if self._problems:
            return "; ".join(self._problems)
        if self._registering or not self._live:
            return "registering endpoints and subscriptions"
        if not self._ready:
            return f"{self.name} not ready yet"
        return None

    # ------------------------------------------------------------------ NATS callbacks

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error", extra={"error": repr(exc)})

    async def _on_disconnected(self) -> None:
        NATS_CONNECTED.labels(self.name).set(0)
        if not self._stopping:
            log.warning("NATS disconnected")

    async def _on_reconnected(self) -> None:
        NATS_RECONNECTS.labels(self.name).inc()
        NATS_CONNECTED.labels(self.name).set(1)
        log.info("NATS reconnected", extra={"server": str(self._nc.connected_url.netloc)})

    async def _on_closed(self) -> None:
        NATS_CONNECTED.labels(self.name).set(0)
        log.info("NATS connection closed")

    async def _ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream (idempotent per replica); an existing one with another config is
        updated by the stream's owner only — other identities may not change it (see
        ``shared.bus.auth``) and use it as the owner configured it."""
        cfg = js_api.StreamConfig(
            name=spec.name,
            description=spec.doc,
            subjects=list(spec.subjects),
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            max_age=spec.max_age_seconds,
            max_bytes=spec.max_bytes,
            duplicate_window=120.0,
        )
        try:
            await self._js.add_stream(cfg)
        except nats.js.errors.BadRequestError:  # exists with another config
            if self.name != spec.owner:
                log.info("stream exists with another config", extra={"stream": spec.name})
                return
            await self._js.update_stream(cfg)

    # ------------------------------------------------------------------ registration

    def _register(self, what: str, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Queue a registration until start(); afterwards run it now, tracked for readiness."""
        if self._stopping:
            raise RuntimeError(f"runtime {self.name} is stopping")
        if not self._live:
            self._queued.append(make)
            return

        async def run() -> None:
            try:
                await make()
                await self.nc.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._problems.append(f"{what}: {exc!r}")
                log.exception("registration failed", extra={"what": what})

        task = asyncio.get_running_loop().create_task(run())
        self._registering.add(task)
        task.add_done_callback(self._registering.discard)

    def endpoint(
        self,
        subject: Subject[Req, Rep],
        handler: Callable[[Req], Awaitable[Rep]],
        *,
        concurrency: int = 1,
    ) -> None:
        """Serve ``subject`` requests with ``handler`` (a ``nats.micro`` endpoint, queue group).

        A NATS subscription hands its messages over one at a time, so by default requests are
        handled in arrival order, one after the other. ``concurrency`` > 1 lets that many
        handlers run at once (the handler then does its own locking); when all are busy the
        subscription waits, so a burst queues in NATS instead of in memory.
        """
        if subject.reply is None:
            raise ValueError(f"{subject.name} is an event: use subscribe()")
        if subject.is_wildcard:
            raise ValueError(f"cannot serve wildcard subject {subject.name}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._register(
            f"endpoint {subject.name}", lambda: self._add_endpoint(subject, handler, concurrency)
        )

    async def _add_endpoint(
        self,
        subject: Subject[Req, Rep],
        handler: Callable[[Req], Awaitable[Rep]],
        concurrency: int,
    ) -> None:
        reply_type = subject.reply
        assert reply_type is not None
        labels = (self.name, subject.name)

        async def serve(req: Any) -> None:
            started = time.perf_counter()
            with tracing.receiving(
                self._tracer, subject.name, service=self.name, headers=req.headers, request=True
            ) as span:
                try:
                    error = await self._serve_one(subject, reply_type, handler, req)
                finally:
                    HANDLER_SECONDS.labels(*labels).observe(time.perf_counter() - started)
                if error is not None:
                    tracing.mark_failed(span, f"{error.code} {error.description}")
            if error is not None:
                if req._msg.reply:
                    raise error  # nats.micro answers it and counts it in $SRV.STATS
                log.warning("request without reply subject failed", extra={"subject": subject.name})

        await self._micro.add_endpoint(
            name=subject.endpoint_name,
            subject=subject.name,
            handler=serve if concurrency == 1 else self._dispatcher(serve, concurrency),
            metadata={"request": subject.request.__name__, "reply": reply_type.__name__},
        )
        log.debug("endpoint registered", extra={"subject": subject.name})

    def _dispatcher(
        self, serve: Callable[[Any], Awaitable[None]], concurrency: int
    ) -> Callable[[Any], Awaitable[None]]:
        """A micro handler that runs ``serve`` in its own task, ``concurrency`` at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def answer(req: Any) -> None:
            try:
                await serve(req)
            except ServiceError as error:  # micro cannot see it from here: answer it ourselves
                with contextlib.suppress(Exception):
                    await req.respond_error(error.code, error.description)
            finally:
                gate.release()

        async def dispatch(req: Any) -> None:
            await gate.acquire()
            task = asyncio.get_running_loop().create_task(answer(req))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

        return dispatch

    async def _serve_one(
        self,
        subject: Subject[Req, Rep],
        reply_type: type[Rep],
        handler: Callable[[Req], Awaitable[Rep]],
        req: Any,
    ) -> ServiceError | None:
        """Decode, handle, reply; returns the error to answer with instead of raising."""
        data: bytes = req.data
        try:
            msg = decode(data, subject.request)
        except msgspec.DecodeError as exc:
            await self._dead_letter(subject.name, data, str(exc))
            return ServiceError("400", f"malformed {subject.request.__name__}: {exc}")
        try:
            reply = await handler(msg)
            if not isinstance(reply, reply_type):
                raise TypeError(
                    f"handler returned {type(reply).__name__}, expected {reply_type.__name__}"
                )
            body = encode(reply)
        except Refused as exc:
            log.info(
                "request refused",
                extra={"subject": subject.name, "code": exc.code, "detail": exc.message},
            )
            return ServiceError(exc.code, exc.message)
        except Exception as exc:
            HANDLER_ERRORS.labels(self.name, subject.name).inc()
            log.exception("handler failed", extra={"subject": subject.name})
            return ServiceError("500", f"{type(exc).__name__}: {exc}")
        if req._msg.reply:
            await req.respond(body)
        return None

    def subscribe(
        self,
        subject: Subject[Req, None],
        handler: Callable[[Req], Awaitable[None]],
        *,
        durable: str | None = None,
        queue: str | None = None,
    ) -> None:
        """Consume events of ``subject``.

        With ``durable``, a JetStream pull consumer (named by ``consumer_name(durable, subject)``)
        gets every event stored since it was created — including those published while this
        process was down — and acks each one after the handler succeeds; replicas using the same
        ``durable`` share the events. A failing handler is retried with back-off and dead-lettered
        after ``MAX_DELIVERIES``. Without ``durable``, a core subscription (``queue`` makes
        replicas share) sees only events published while it is connected.
        """
        if subject.reply is not None:
            raise ValueError(f"{subject.name} is a request subject: use endpoint()")
        if durable is not None and not subject.durable:
            raise ValueError(f"{subject.name} is not stored in a stream: no durable consumer")
        if durable is not None:
            self._register(
                f"durable {durable} on {subject.name}",
                lambda: self._add_pull(subject, handler, durable),
            )
        else:
            self._register(
                f"subscription {subject.name}", lambda: self._add_core(subject, handler, queue)
            )

    async def _add_core(
        self,
        subject: Subject[Req, None],
        handler: Callable[[Req], Awaitable[None]],
        queue: str | None,
    ) -> None:
        async def on_msg(msg: Any) -> None:
            await self._consume(subject, msg.subject, msg.data, handler, msg.headers)

        self._subs.append(await self.nc.subscribe(subject.name, queue=queue or "", cb=on_msg))

    async def _add_pull(
        self, subject: Subject[Req, None], handler: Callable[[Req], Awaitable[None]], durable: str
    ) -> None:
        name = consumer_name(durable, subject)
        config = js_api.ConsumerConfig(
            durable_name=name,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=_ACK_WAIT,
            max_ack_pending=1000,
            filter_subject=subject.name,
        )
        psub = await self._js.pull_subscribe(
            subject.name, durable=name, stream=stream_of(subject).name, config=config
        )
        self._subs.append(psub)
        task = asyncio.get_running_loop().create_task(self._pull_loop(subject, handler, psub))
        self._pullers.append(task)

    async def _pull_loop(
        self, subject: Subject[Req, None], handler: Callable[[Req], Awaitable[None]], psub: Any
    ) -> None:
        while True:
            try:
                msgs = await psub.fetch(batch=_FETCH_BATCH, timeout=_FETCH_TIMEOUT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnecting, consumer deleted, …: keep trying
                log.warning("fetch failed", extra={"subject": subject.name, "error": repr(exc)})
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                await self._consume_durable(subject, handler, msg)

    async def _consume_durable(
        self, subject: Subject[Req, None], handler: Callable[[Req], Awaitable[None]], msg: Any
    ) -> None:
        outcome = await self._consume(subject, msg.subject, msg.data, handler, msg.headers)
        try:
            if outcome != "failed":
                await msg.ack()  # handled, or dead-lettered: either way done with it
                return
            delivered = int(msg.metadata.num_delivered)
            if delivered >= MAX_DELIVERIES:
                await self._dead_letter(
                    msg.subject, msg.data, f"handler failed {delivered} times", failed=True
                )
                await msg.term()
            else:
                await msg.nak(delay=min(2.0**delivered, 30.0))
        except Exception as exc:  # the ack is lost: JetStream redelivers after ack_wait
            log.warning("ack failed", extra={"subject": subject.name, "error": repr(exc)})

    async def _consume(
        self,
        subject: Subject[Req, None],
        actual: str,
        data: bytes,
        handler: Callable[[Req], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> str:
        """Decode and handle one event; returns ``ok``, ``malformed`` or ``failed``."""
        with tracing.receiving(
            self._tracer,
            subject.name,
            service=self.name,
            headers=headers,
            request=False,
            destination=actual,
        ) as span:
            outcome = await self._consume_one(subject, actual, data, handler)
            if outcome != "ok":
                tracing.mark_failed(span, outcome)
            return outcome

    async def _consume_one(
        self,
        subject: Subject[Req, None],
        actual: str,
        data: bytes,
        handler: Callable[[Req], Awaitable[None]],
    ) -> str:
        labels = (self.name, subject.name)
        started = time.perf_counter()
        try:
            try:
                msg = decode(data, subject.request)
            except msgspec.DecodeError as exc:
                await self._dead_letter(actual, data, str(exc))
                return "malformed"
            try:
                await handler(msg)
            except Exception:
                HANDLER_ERRORS.labels(*labels).inc()
                log.exception("event handler failed", extra={"subject": actual})
                return "failed"
            return "ok"
        finally:
            HANDLER_SECONDS.labels(*labels).observe(time.perf_counter() - started)

    async def _dead_letter(
        self, subject: str, payload: bytes, error: str, *, failed: bool = False
    ) -> None:
        """Publish the reject verbatim (truncated if huge) and count it; never raises."""
        DEADLETTER.labels(self.name, subject).inc()
        log.warning(
            "message dead-lettered",
            extra={"subject": subject, "error": error, "handler_failed": failed},
        )
        if subject.startswith(f"{DEADLETTER_PREFIX}."):
            return  # a broken dead letter is logged and counted, never re-dead-lettered
        if len(payload) > MAX_DEADLETTER_PAYLOAD:
            error = f"{error} (payload truncated from {len(payload)} bytes)"
            payload = payload[:MAX_DEADLETTER_PAYLOAD]
        letter = DeadLetter(subject=subject, service=self.name, error=error, payload=payload)
        try:
            await self.nc.publish(deadletter_subject(subject), encode(letter))
        except Exception as exc:
            log.warning("dead-letter publish failed", extra={"error": repr(exc)})

    # ------------------------------------------------------------------ sending

    async def request(
        self,
        subject: Subject[Req, Rep],
        msg: Req,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Rep:
        """Send a request and decode the reply strictly; any failure raises :class:`BusError`."""
        reply_type = subject.reply
        if reply_type is None:
            raise ValueError(f"{subject.name} is an event: use publish()")
        if not isinstance(msg, subject.request):
            raise TypeError(f"{subject.name} takes {subject.request.__name__}, not {type(msg)}")
        with tracing.sending(
            self._tracer, subject.name, service=self.name, headers=headers, request=True
        ) as hdrs:
            try:
                resp = await self.nc.request(
                    subject.name, encode(msg), timeout=timeout, headers=hdrs or None
                )
            except nats.errors.NoRespondersError:
                raise BusError(subject.name, "503", "no responders") from None
            except (TimeoutError, nats.errors.TimeoutError):
                raise BusError(subject.name, "408", f"no reply within {timeout}s") from None
            reply_headers: dict[str, str] = resp.headers or {}
            if ERROR_HEADER in reply_headers:
                code = reply_headers.get(ERROR_CODE_HEADER, "500")
                raise BusError(subject.name, code, reply_headers[ERROR_HEADER])
            try:
                return decode(resp.data, reply_type)
            except msgspec.DecodeError as exc:
                raise BusError(subject.name, "502", f"malformed reply: {exc}") from None

    async def publish(
        self,
        subject: Subject[Req, None],
        msg: Req,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Publish an event; durable subjects go through JetStream and wait for the store's ack.

        ``msg_id`` sets ``Nats-Msg-Id`` so JetStream drops a re-publish of the same event within
        its two-minute duplicate window (use a deterministic id, e.g. ``<lease>:closed``).
        """
        if subject.reply is not None:
            raise ValueError(f"{subject.name} is a request subject: use request()")
        if subject.is_wildcard:
            raise ValueError(f"cannot publish to wildcard subject {subject.name}")
        if not isinstance(msg, subject.request):
            raise TypeError(f"{subject.name} takes {subject.request.__name__}, not {type(msg)}")
        data = encode(msg)
        with tracing.sending(
            self._tracer, subject.name, service=self.name, headers=headers, request=False
        ) as hdrs:
            if msg_id is not None:
                hdrs["Nats-Msg-Id"] = msg_id
            if subject.durable:
                try:
                    await self._js.publish(
                        subject.name,
                        data,
                        timeout=timeout,
                        stream=stream_of(subject).name,
                        headers=hdrs or None,
                    )
                except (TimeoutError, nats.errors.Error) as exc:
                    raise BusError(
                        subject.name, "503", f"JetStream publish failed: {exc}"
                    ) from None
            else:
                await self.nc.publish(subject.name, data, headers=hdrs or None)
