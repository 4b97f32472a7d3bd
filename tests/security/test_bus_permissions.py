"""The bus is closed: a real nats-server running exactly the authorization ``shared.bus.auth``
renders (the catalog's identities, no test user), five runtimes each connected as its own service.

Each service identity can do what its service does (register its endpoints and durable
consumers, create the streams, send its requests and events, dead-letter, keep the binder's
journal) and nothing more: every forbidden publish or subscription gets a permissions violation
from the server, and the tests check that the message reached no subscriber and no stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
import pytest_asyncio

from services.binder.journal import Journal, entry_subject
from shared.bus import (
    ACTIVATE,
    COMMIT,
    LEDGER,
    NODE_FAILED,
    PLAN,
    RESERVE,
    RUN_CHANGED,
    ActivateReply,
    ActivateRequest,
    CommitReply,
    CommitRequest,
    DeadLetter,
    LedgerEvent,
    NodeFailed,
    RunChanged,
    RunRef,
    ServiceRuntime,
)
from shared.bus.messages import decode, encode
from shared.bus.subjects import (
    CATALOG,
    DEADLETTER,
    EVENTS_STREAM,
    IDENTITIES,
    JOURNAL_STREAM,
    OPERATOR,
    SERVICES,
    STREAMS,
    inbox_prefix,
)
from shared.localenv.natsserver import NatsServer

pytestmark = [pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

WAIT = 10.0


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with the rendered authorization and nothing else."""
    server = NatsServer(workdir=tmp_path_factory.mktemp("bus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Peer:
    """A raw connection of one identity that records the server's permission violations."""

    identity: str
    nc: Any = None
    violations: list[str] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_error(self, exc: Exception) -> None:
        async with self.arrived:
            self.violations.append(str(exc).lower())
            self.arrived.notify_all()

    async def refused(
        self, what: str, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> str:
        """``await call(*args, **kwargs)``; the server must answer with a permissions violation
        naming ``what`` (``publish to "<subject>"`` / ``subscription to "<subject>"``)."""
        before = len(self.violations)
        # a denied request is dropped by the server: nobody answers it
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            await call(*args, **kwargs)
        needle = what.lower()

        def reported() -> bool:
            return any(needle in v for v in self.violations[before:])

        async with self.arrived:
            try:
                await asyncio.wait_for(self.arrived.wait_for(reported), WAIT)
            except TimeoutError:
                raise AssertionError(
                    f"{self.identity}: no violation {what}: {self.violations[before:]}"
                ) from None
        return next(v for v in self.violations[before:] if needle in v)


async def connect(bus: NatsServer, identity: str) -> Peer:
    peer = Peer(identity)
    peer.nc = await nats.connect(
        bus.url, error_cb=peer.on_error, allow_reconnect=False, **bus.connect_options(identity)
    )
    return peer


@pytest_asyncio.fixture
async def peers(bus: NatsServer) -> AsyncIterator[dict[str, Peer]]:
    """A fresh connection per identity (the server reports a repeated violation only once)."""
    made = {i: await connect(bus, i) for i in IDENTITIES}
    try:
        yield made
    finally:
        for peer in made.values():
            await peer.nc.close()


@dataclass
class Seen:
    """What the services' handlers received, by subject."""

    messages: dict[str, list[Any]] = field(default_factory=dict)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def handler(self, key: str, reply: Any = None) -> Callable[[Any], Awaitable[Any]]:
        async def handle(msg: Any) -> Any:
            async with self.arrived:
                self.messages.setdefault(key, []).append(msg)
                self.arrived.notify_all()
            return reply

        return handle

    async def wait_for(self, key: str, predicate: Callable[[Any], bool]) -> Any:
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: any(map(predicate, self.messages.get(key, [])))),
                WAIT,
            )
        return next(m for m in self.messages[key] if predicate(m))

    def of(self, key: str) -> list[Any]:
        return list(self.messages.get(key, []))


NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest_asyncio.fixture(scope="module")
async def services(bus: NatsServer) -> AsyncIterator[tuple[dict[str, ServiceRuntime], Seen]]:
    """The five runtimes, each as its own identity, registering what its service registers."""
    seen = Seen()
    rts = {n: ServiceRuntime(n, nats_url=bus.url, credentials=bus.credentials(n)) for n in SERVICES}
    rts["admission"].subscribe(LEDGER, seen.handler("admission/ledger"), durable="admission")
    rts["admission"].subscribe(RUN_CHANGED, seen.handler("admission/run"), queue="admission")
    rts["packer"].endpoint(PLAN, seen.handler("packer/plan"))
    rts["forecast"].endpoint(RESERVE, seen.handler("forecast/reserve"))
    rts["forecast"].subscribe(LEDGER, seen.handler("forecast/ledger"), durable="forecast")
    reply = ActivateReply(released=False, seed=None, message="recorded")
    rts["resolver"].endpoint(ACTIVATE, seen.handler("resolver/activate", reply))
    rts["resolver"].subscribe(NODE_FAILED, seen.handler("resolver/node"), durable="resolver")
    rts["binder"].endpoint(COMMIT, seen.handler("binder/commit", CommitReply(ok=True)))
    started: list[ServiceRuntime] = []
    try:
        for rt in rts.values():
            await asyncio.wait_for(rt.start(), 30)
            rt.set_ready(True)
            started.append(rt)
        yield rts, seen
    finally:
        for rt in reversed(started):
            await rt.stop()


async def stored(peers: dict[str, Peer], stream: str) -> int:
    """Messages in a stream, as the operator sees them."""
    info = await peers[OPERATOR].nc.jetstream().stream_info(stream)
    return int(info.state.messages)


# --------------------------------------------------------------------------- who may connect


async def test_anonymous_and_wrong_password_clients_are_refused(bus: NatsServer) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(bus.url, allow_reconnect=False, max_reconnect_attempts=0)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(bus.url, user="binder", password="guessed", allow_reconnect=False)
    password = bus.password_file("packer").read_text().strip()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # packer's, as binder
        await nats.connect(bus.url, user="binder", password=password, allow_reconnect=False)


async def test_the_config_holds_no_password(bus: NatsServer) -> None:
    text = bus.config_path.read_text()
    for identity in IDENTITIES:
        assert bus.password_file(identity).read_text().strip() not in text
    assert text.count('password: "$2a$') == len(IDENTITIES)


# --------------------------------------------------------------------------- what each may do


async def test_every_service_starts_and_talks_with_its_own_permissions(
    services: tuple[dict[str, ServiceRuntime], Seen], peers: dict[str, Peer]
) -> None:
    """Registration (streams, durable consumers, nats.micro) worked; now every flow of the
    catalog, each sent by its producer and handled by its consumer."""
    rts, seen = services
    letters: list[DeadLetter] = []
    got_letter = asyncio.Event()

    async def on_letter(msg: Any) -> None:
        letters.append(decode(msg.data, DeadLetter))
        got_letter.set()

    sub = await peers[OPERATOR].nc.subscribe(DEADLETTER.name, cb=on_letter)
    try:
        # requests: an undecodable body is dead-lettered by the endpoint and answered 400,
        # which proves the route, the reply and the consumer's dead-letter grant
        for sender, subject in (
            ("admission", PLAN),
            ("resolver", PLAN),
            ("admission", COMMIT),
            ("resolver", COMMIT),
            ("admission", RESERVE),
        ):
            resp = await rts[sender].nc.request(subject.name, b"{}", timeout=WAIT)
            assert resp.headers["Nats-Service-Error-Code"] == "400", (sender, subject.name)
        await asyncio.wait_for(got_letter.wait(), WAIT)
        activated = await rts["forecast"].request(
            ACTIVATE, ActivateRequest(namespace="ns", name="r", uid="u"), timeout=WAIT
        )
        assert activated.message == "recorded"
        # events, durable and core
        await rts["packer"].publish(NODE_FAILED, NodeFailed(node="n-ok", at=NOW, reason="test"))
        await seen.wait_for("resolver/node", lambda m: m.node == "n-ok")
        event = LedgerEvent(
            kind="opened", lease="l-ok", run=("ns", "r"), envelope="e", gpus=1, at=NOW
        )
        await rts["binder"].publish(LEDGER, event)
        await seen.wait_for("admission/ledger", lambda m: m.lease == "l-ok")
        await seen.wait_for("forecast/ledger", lambda m: m.lease == "l-ok")
        for sender in ("resolver", "binder"):
            await rts[sender].publish(RUN_CHANGED, RunChanged(namespace="ns", name=sender))
            await seen.wait_for("admission/run", lambda m, s=sender: m.name == s)
    finally:
        await sub.unsubscribe()
    assert {letter.service for letter in letters} >= {"packer"}
    assert not any(p.violations for p in peers.values())
    # $SRV discovery of its own service answers for the operator
    info = await peers[OPERATOR].nc.request("$SRV.INFO.jobtree-binder", b"", timeout=WAIT)
    assert json.loads(info.data)["name"] == "jobtree-binder"


async def test_only_the_binder_keeps_its_journal(
    services: tuple[dict[str, ServiceRuntime], Seen], peers: dict[str, Peer]
) -> None:
    rts, _ = services
    journal = Journal(rts["binder"].nc)
    await journal.open()
    commit = CommitRequest(key="sec-journal", run=RunRef("ns", "r", "u", 1), version=1)
    await journal.record(commit)
    assert [c.key for c, _ in await journal.pending()] == ["sec-journal"]
    await journal.done("sec-journal")
    assert await journal.pending() == []
    # anybody else: no write into it (core or JetStream), no purge, no delete, no read
    forged = CommitRequest(key="forged", run=RunRef("victim", "r", "u", 1), version=1)
    for identity in IDENTITIES:
        if identity == "binder":
            continue
        peer = peers[identity]
        js = peer.nc.jetstream()
        subject = entry_subject("forged")
        await peer.refused(subject, peer.nc.publish, subject, encode(forged))
        await peer.refused(subject, js.publish, subject, encode(forged), timeout=0.5)
        for api in ("PURGE", "DELETE", "MSG.GET", "UPDATE"):
            target = f"$JS.API.STREAM.{api}.{JOURNAL_STREAM.name}"
            await peer.refused(target, peer.nc.publish, target, b"{}")
    assert await journal.pending() == [], "a forged commit reached the binder's journal"


async def test_nobody_deletes_or_purges_the_event_streams(
    services: tuple[dict[str, ServiceRuntime], Seen], peers: dict[str, Peer]
) -> None:
    before = {s.name: await stored(peers, s.name) for s in STREAMS}
    assert before[EVENTS_STREAM.name] > 0  # the flows above stored events
    for identity in IDENTITIES:
        peer = peers[identity]
        for stream in STREAMS:
            for api in ("DELETE", "PURGE", "MSG.DELETE"):
                target = f"$JS.API.STREAM.{api}.{stream.name}"
                await peer.refused(target, peer.nc.publish, target, b"{}")
            if identity != stream.owner:
                target = f"$JS.API.STREAM.UPDATE.{stream.name}"
                await peer.refused(target, peer.nc.publish, target, b"{}")
        # nor a stream of its own capturing the commit subject
        rogue = "$JS.API.STREAM.CREATE.ROGUE"
        body = json.dumps({"name": "ROGUE", "subjects": [COMMIT.name]}).encode()
        await peer.refused(rogue, peer.nc.publish, rogue, body)
    after = {s.name: await stored(peers, s.name) for s in STREAMS}
    assert after == before


# --------------------------------------------------------------------------- forged messages


async def test_a_forged_commit_is_refused_and_reaches_no_binder(
    services: tuple[dict[str, ServiceRuntime], Seen], peers: dict[str, Peer]
) -> None:
    rts, seen = services
    forged = encode(CommitRequest(key="forged-commit", run=RunRef("v", "r", "u", 1), version=1))
    for identity in ("packer", "forecast", "binder", OPERATOR):
        peer = peers[identity]
        what = f'publish to "{COMMIT.name}"'
        await peer.refused(what, peer.nc.request, COMMIT.name, forged, timeout=1)
    # nobody but the binder may listen on it (or snoop a proposer's replies)
    for identity in ("admission", "packer", "forecast", "resolver", OPERATOR):
        peer = peers[identity]
        await peer.refused(f'subscription to "{COMMIT.name}"', peer.nc.subscribe, COMMIT.name)
        snoop = f"{inbox_prefix('admission')}.>"
        if identity != "admission":
            await peer.refused(f'subscription to "{snoop}"', peer.nc.subscribe, snoop)
    # a commit the admission identity sends afterwards arrives; the forged ones never did
    marker = CommitRequest(key="marker", run=RunRef("ns", "r", "u", 1), version=1)
    await rts["admission"].nc.request(COMMIT.name, encode(marker), timeout=WAIT)
    await seen.wait_for("binder/commit", lambda m: m.key == "marker")
    assert [m.key for m in seen.of("binder/commit")] == ["marker"]


async def test_a_forged_node_failure_is_refused_and_never_stored(
    services: tuple[dict[str, ServiceRuntime], Seen], peers: dict[str, Peer]
) -> None:
    rts, seen = services
    before = await stored(peers, EVENTS_STREAM.name)
    forged = encode(NodeFailed(node="healthy-node", at=NOW, reason="forged"))
    for identity in IDENTITIES:
        if identity == "packer":
            continue
        peer = peers[identity]
        what = f'publish to "{NODE_FAILED.name}"'
        await peer.refused(what, peer.nc.publish, NODE_FAILED.name, forged)
        js = peer.nc.jetstream()
        await peer.refused(what, js.publish, NODE_FAILED.name, forged, timeout=0.5)
    assert await stored(peers, EVENTS_STREAM.name) == before
    await rts["packer"].publish(NODE_FAILED, NodeFailed(node="marker", at=NOW, reason="test"))
    await seen.wait_for("resolver/node", lambda m: m.node == "marker")
    assert "healthy-node" not in {m.node for m in seen.of("resolver/node")}


async def test_activate_is_refused_from_anyone_but_the_forecaster(
    services: tuple[dict[str, ServiceRuntime], Seen], peers: dict[str, Peer]
) -> None:
    rts, seen = services
    forged = encode(ActivateRequest(namespace="victim", name="r", uid="u"))
    for identity in IDENTITIES:
        if identity == "forecast":
            continue
        peer = peers[identity]
        what = f'publish to "{ACTIVATE.name}"'
        await peer.refused(what, peer.nc.request, ACTIVATE.name, forged, timeout=1)
    marker = ActivateRequest(namespace="ns", name="marker", uid="u")
    await rts["forecast"].request(ACTIVATE, marker, timeout=WAIT)
    await seen.wait_for("resolver/activate", lambda m: m.name == "marker")
    assert "victim" not in {m.namespace for m in seen.of("resolver/activate")}


async def test_every_identity_publishes_only_what_it_produces(
    services: tuple[dict[str, ServiceRuntime], Seen], peers: dict[str, Peer]
) -> None:
    """The whole matrix: for each identity and each catalog subject it does not produce, a
    publish is a violation (the deny is the server's, not the client library's)."""
    checked = 0
    for identity in IDENTITIES:
        peer = peers[identity]
        for subject in CATALOG:
            if subject is DEADLETTER or identity in subject.producers:
                continue
            what = f'publish to "{subject.name}"'
            await peer.refused(what, peer.nc.publish, subject.name, b"{}")
            checked += 1
    assert checked >= 25


async def test_the_password_files_are_private(bus: NatsServer) -> None:
    for identity in IDENTITIES:
        path: Path = bus.password_file(identity)
        assert path.stat().st_mode & 0o077 == 0, path
