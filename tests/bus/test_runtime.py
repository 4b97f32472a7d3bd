"""ServiceRuntime against a real nats-server with JetStream: endpoints, queue groups, dead
letters, durable events, probes, metrics and shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from shared.bus.messages import (
    CommitReply,
    DeadLetter,
    LedgerEvent,
    RunChanged,
    RunRef,
    decode,
    encode,
)
from shared.bus.runtime import MAX_DELIVERIES, BusError, ServiceRuntime
from shared.bus.subjects import (
    EVENTS_STREAM,
    LEDGER,
    NODE_FAILED,
    PLAN,
    RUN_CHANGED,
    Subject,
    consumer_name,
    deadletter_of,
)
from shared.localenv.natsserver import NatsServer
from tests.conftest import TESTER

pytestmark = [pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
RUN = RunRef(namespace="ns", name="r", uid="u", generation=1)

Factory = Callable[..., Awaitable[ServiceRuntime]]


def uid() -> str:
    return uuid.uuid4().hex[:10]


def echo_subject() -> Subject[RunRef, CommitReply]:
    """A private request subject per test, so tests never see each other's replicas."""
    return Subject(f"jobtree.v1.test{uid()}.echo", RunRef, CommitReply)


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def http_get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of one GET on localhost."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


async def wait_ready(port: int, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await http_get(port, "/readyz"))[0] != 200:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("/readyz never answered 200")
        await asyncio.sleep(0.02)


@pytest.fixture
async def runtime(nats_server: NatsServer) -> AsyncIterator[Factory]:
    """Build runtimes on the session's nats-server; all are stopped after the test."""
    made: list[ServiceRuntime] = []

    async def make(
        name: str, setup: Callable[[ServiceRuntime], None] | None = None, *, ready: bool = True
    ) -> ServiceRuntime:
        rt = ServiceRuntime(
            name, nats_url=nats_server.url, credentials=nats_server.credentials(TESTER)
        )
        made.append(rt)
        if setup is not None:
            setup(rt)
        await rt.start()
        rt.set_ready(ready)
        return rt

    yield make
    for rt in made:
        await rt.stop()


# --------------------------------------------------------------------------- request / reply


async def test_request_reply_round_trip(runtime: Factory) -> None:
    subject = echo_subject()

    async def handle(ref: RunRef) -> CommitReply:
        return CommitReply(ok=True, created=[f"{ref.namespace}/{ref.name}@{ref.generation}"])

    await runtime(f"svc{uid()}", lambda rt: rt.endpoint(subject, handle))
    client = await runtime(f"cli{uid()}")
    reply = await client.request(subject, RUN)
    assert reply == CommitReply(ok=True, created=["ns/r@1"])


async def test_endpoint_added_after_start_is_served(runtime: Factory) -> None:
    subject = echo_subject()
    server = await runtime(f"late{uid()}")

    async def handle(ref: RunRef) -> CommitReply:
        return CommitReply(ok=True)

    server.endpoint(subject, handle)
    await wait_ready(server.http_port)
    client = await runtime(f"cli{uid()}")
    assert (await client.request(subject, RUN)).ok


async def test_replicas_share_requests_and_answer_ping(runtime: Factory) -> None:
    subject = echo_subject()
    name = f"shared{uid()}"
    served: dict[str, int] = {}

    def replica(tag: str) -> Callable[[ServiceRuntime], None]:
        async def handle(ref: RunRef) -> CommitReply:
            served[tag] = served.get(tag, 0) + 1
            return CommitReply(ok=True, conflict=tag)

        return lambda rt: rt.endpoint(subject, handle)

    one = await runtime(name, replica("one"))
    two = await runtime(name, replica("two"))
    client = await runtime(f"cli{uid()}")
    replies = await asyncio.gather(*(client.request(subject, RUN) for _ in range(60)))
    assert sum(served.values()) == 60
    assert served.get("one", 0) > 0 and served.get("two", 0) > 0, served  # one queue group
    assert {r.conflict for r in replies} == {"one", "two"}

    inbox = client.nc.new_inbox()
    pongs: list[dict[str, Any]] = []
    sub = await client.nc.subscribe(inbox, cb=functools.partial(_collect, pongs))
    await client.nc.publish(f"$SRV.PING.jobtree-{name}", b"", reply=inbox)
    await wait_for(lambda: len(pongs) >= 2)
    await sub.unsubscribe()
    assert {p["id"] for p in pongs} == {one.micro_id, two.micro_id}
    assert {p["name"] for p in pongs} == {f"jobtree-{name}"}

    info = json.loads((await client.nc.request(f"$SRV.INFO.jobtree-{name}", b"")).data)
    assert [e["subject"] for e in info["endpoints"]] == [subject.name]
    assert info["endpoints"][0]["queue_group"] == "q"


async def _collect(into: list[dict[str, Any]], msg: Any) -> None:
    into.append(json.loads(msg.data))


async def test_malformed_requests_go_to_dead_letter_and_service_survives(
    runtime: Factory,
) -> None:
    subject = echo_subject()
    name = f"strict{uid()}"
    letters: list[DeadLetter] = []

    async def handle(ref: RunRef) -> CommitReply:
        return CommitReply(ok=True)

    async def on_letter(letter: DeadLetter) -> None:
        letters.append(letter)

    await runtime(name, lambda rt: rt.endpoint(subject, handle))
    watcher = await runtime(
        f"ops{uid()}", lambda rt: rt.subscribe(deadletter_of(subject), on_letter)
    )
    await watcher.nc.flush()

    bad_payloads = [
        b"{not json",
        b'{"namespace": "ns", "name": "r", "uid": "u", "generation": "one"}',
        b'{"namespace": "ns", "name": "r", "uid": "u", "generation": 1, "surprise": true}',
    ]
    for bad in bad_payloads:
        resp = await watcher.nc.request(subject.name, bad, timeout=5)
        assert resp.headers["Nats-Service-Error-Code"] == "400"
        assert "malformed RunRef" in resp.headers["Nats-Service-Error"]

    await wait_for(lambda: len(letters) == len(bad_payloads))
    assert [letter.payload for letter in letters] == bad_payloads
    assert {letter.subject for letter in letters} == {subject.name}
    assert {letter.service for letter in letters} == {name}
    assert "generation" in letters[1].error and "surprise" in letters[2].error
    assert sample("jobtree_deadletter_total", service=name, subject=subject.name) == 3

    assert (await watcher.request(subject, RUN)).ok  # still answering

    stats = json.loads((await watcher.nc.request(f"$SRV.STATS.jobtree-{name}", b"")).data)
    assert stats["endpoints"][0]["num_requests"] == 4
    assert stats["endpoints"][0]["num_errors"] == 3


async def test_handler_exception_becomes_bus_error(runtime: Factory) -> None:
    subject = echo_subject()
    name = f"boom{uid()}"

    async def handle(ref: RunRef) -> CommitReply:
        if ref.generation == 13:
            raise RuntimeError("unlucky generation")
        return CommitReply(ok=True)

    await runtime(name, lambda rt: rt.endpoint(subject, handle))
    client = await runtime(f"cli{uid()}")
    with pytest.raises(BusError) as err:
        await client.request(subject, RunRef("ns", "r", "u", 13))
    assert err.value.code == "500"
    assert "RuntimeError: unlucky generation" in err.value.message
    assert err.value.subject == subject.name
    assert sample("jobtree_handler_errors_total", service=name, subject=subject.name) == 1
    assert sample("jobtree_handler_seconds_count", service=name, subject=subject.name) == 1
    assert (await client.request(subject, RUN)).ok


async def test_concurrent_endpoint_overlaps_requests_up_to_its_limit(runtime: Factory) -> None:
    """Three requests that each wait for the others complete only if they are handled at once;
    the fourth waits for a free slot; a failing one is still answered with its error."""
    subject = echo_subject()
    inside = 0
    most = 0
    all_in = asyncio.Event()

    async def handle(ref: RunRef) -> CommitReply:
        nonlocal inside, most
        if ref.generation == 13:
            raise RuntimeError("unlucky generation")
        inside += 1
        most = max(most, inside)
        if inside == 3:
            all_in.set()
        await all_in.wait()
        inside -= 1
        return CommitReply(ok=True, created=[str(ref.generation)])

    await runtime(f"wide{uid()}", lambda rt: rt.endpoint(subject, handle, concurrency=3))
    client = await runtime(f"cli{uid()}")
    replies = await asyncio.gather(
        *(client.request(subject, RunRef("ns", "r", "u", g), timeout=5.0) for g in range(4))
    )
    assert sorted(r.created[0] for r in replies) == ["0", "1", "2", "3"]
    assert most == 3
    with pytest.raises(BusError) as err:
        await client.request(subject, RunRef("ns", "r", "u", 13), timeout=5.0)
    assert err.value.code == "500" and "unlucky generation" in err.value.message


async def test_serial_endpoint_handles_one_request_at_a_time(runtime: Factory) -> None:
    subject = echo_subject()
    inside = 0
    most = 0

    async def handle(ref: RunRef) -> CommitReply:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.01)
        inside -= 1
        return CommitReply(ok=True)

    await runtime(f"narrow{uid()}", lambda rt: rt.endpoint(subject, handle))
    client = await runtime(f"cli{uid()}")
    await asyncio.gather(*(client.request(subject, RUN, timeout=5.0) for _ in range(4)))
    assert most == 1


async def test_wrong_reply_type_is_an_error(runtime: Factory) -> None:
    subject = echo_subject()

    async def handle(ref: RunRef) -> Any:
        return RunChanged("ns", "r")

    await runtime(f"typo{uid()}", lambda rt: rt.endpoint(subject, handle))
    client = await runtime(f"cli{uid()}")
    with pytest.raises(BusError, match="expected CommitReply"):
        await client.request(subject, RUN)


async def test_no_responders_and_timeout(runtime: Factory) -> None:
    subject = echo_subject()
    client = await runtime(f"cli{uid()}")
    with pytest.raises(BusError) as err:
        await client.request(subject, RUN, timeout=1)
    assert err.value.code == "503"

    async def slow(ref: RunRef) -> CommitReply:
        await asyncio.sleep(1.0)
        return CommitReply(ok=True)

    await runtime(f"slow{uid()}", lambda rt: rt.endpoint(subject, slow))
    with pytest.raises(BusError) as err:
        await client.request(subject, RUN, timeout=0.2)
    assert err.value.code == "408"


async def test_misuse_is_refused_early(runtime: Factory) -> None:
    rt = await runtime(f"misuse{uid()}")
    with pytest.raises(ValueError, match="use subscribe"):
        rt.endpoint(LEDGER, _never)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        rt.endpoint(echo_subject(), _never, concurrency=0)
    with pytest.raises(ValueError, match="no durable consumer"):
        rt.subscribe(RUN_CHANGED, _never, durable="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use request"):
        await rt.publish(PLAN, RUN)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes PlanRequest"):
        await rt.request(PLAN, RUN)  # type: ignore[arg-type]


async def _never(msg: Any) -> None:
    raise AssertionError("not reached")


# --------------------------------------------------------------------------- events


async def test_core_event_reaches_a_queue_subscriber(runtime: Factory) -> None:
    seen: list[RunChanged] = []
    mark = uid()

    async def on_change(ev: RunChanged) -> None:
        if ev.namespace == mark:
            seen.append(ev)

    sub = await runtime(
        f"adm{uid()}", lambda rt: rt.subscribe(RUN_CHANGED, on_change, queue="admission")
    )
    await sub.nc.flush()
    pub = await runtime(f"pub{uid()}")
    await pub.publish(RUN_CHANGED, RunChanged(mark, "r"), headers={"traceparent": "00-x"})
    await wait_for(lambda: len(seen) == 1)


def ledger(lease: str, kind: str = "opened") -> LedgerEvent:
    return LedgerEvent(
        kind="opened" if kind == "opened" else "closed",
        lease=lease,
        run=("ns", "r"),
        envelope="b/e",
        gpus=8,
        at=T0,
    )


async def test_durable_subscriber_gets_events_from_while_it_was_down(
    runtime: Factory, nats_server: NatsServer
) -> None:
    tag, durable = uid(), f"forecast{uid()}"
    publisher = await runtime(f"binder{uid()}")
    await publisher.publish(LEDGER, ledger(f"{tag}-a"))  # before any subscriber exists

    first: list[str] = []

    async def on_first(ev: LedgerEvent) -> None:
        if ev.lease.startswith(tag):
            first.append(ev.lease)

    sub1 = await runtime(f"fc{uid()}", lambda rt: rt.subscribe(LEDGER, on_first, durable=durable))
    await wait_for(lambda: first == [f"{tag}-a"])
    await sub1.stop()

    await publisher.publish(LEDGER, ledger(f"{tag}-b", "closed"))  # while it is down
    second: list[str] = []

    async def on_second(ev: LedgerEvent) -> None:
        if ev.lease.startswith(tag):
            second.append(ev.lease)

    await runtime(f"fc{uid()}", lambda rt: rt.subscribe(LEDGER, on_second, durable=durable))
    await wait_for(lambda: second == [f"{tag}-b"])
    await asyncio.sleep(0.3)
    assert second == [f"{tag}-b"]  # "a" was acked by the first incarnation: not redelivered

    js = publisher.nc.jetstream()

    async def settled() -> bool:
        info = await js.consumer_info(EVENTS_STREAM.name, consumer_name(durable, LEDGER))
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    await _poll(settled)


async def test_durable_consumers_are_per_subject(runtime: Factory) -> None:
    durable = f"resolver{uid()}"

    def setup(rt: ServiceRuntime) -> None:
        rt.subscribe(LEDGER, _ignore, durable=durable)
        rt.subscribe(NODE_FAILED, _ignore, durable=durable)

    await runtime(f"rs{uid()}", setup)
    js = (await runtime(f"cli{uid()}")).nc.jetstream()
    for subject in (LEDGER, NODE_FAILED):
        info = await js.consumer_info(EVENTS_STREAM.name, consumer_name(durable, subject))
        assert info.config.filter_subject == subject.name
    with pytest.raises(NotFoundError):
        await js.consumer_info(EVENTS_STREAM.name, durable)


async def _ignore(msg: Any) -> None:
    return None


async def test_malformed_durable_event_is_dead_lettered_and_acked(runtime: Factory) -> None:
    name, durable = f"pk{uid()}", f"packer{uid()}"
    tag = uid()
    good: list[str] = []
    letters: list[DeadLetter] = []

    async def on_event(ev: LedgerEvent) -> None:
        if ev.lease.startswith(tag):
            good.append(ev.lease)

    async def on_letter(letter: DeadLetter) -> None:
        if tag.encode() in letter.payload:
            letters.append(letter)

    ops = await runtime(f"ops{uid()}", lambda rt: rt.subscribe(deadletter_of(LEDGER), on_letter))
    await ops.nc.flush()
    js = ops.nc.jetstream()
    bad = json.dumps({"kind": "opened", "lease": tag, "gpus": "eight"}).encode()
    await js.publish(LEDGER.name, bad)
    await js.publish(LEDGER.name, encode(ledger(f"{tag}-ok")))

    await runtime(name, lambda rt: rt.subscribe(LEDGER, on_event, durable=durable))
    await wait_for(lambda: good == [f"{tag}-ok"] and len(letters) == 1)
    assert letters[0].payload == bad
    assert sample("jobtree_deadletter_total", service=name, subject=LEDGER.name) == 1

    async def settled() -> bool:
        info = await js.consumer_info(EVENTS_STREAM.name, consumer_name(durable, LEDGER))
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    await _poll(settled)


async def test_failing_event_handler_is_retried_then_succeeds(runtime: Factory) -> None:
    tag, durable = uid(), f"retry{uid()}"
    attempts: list[str] = []

    async def flaky(ev: LedgerEvent) -> None:
        if not ev.lease.startswith(tag):
            return
        attempts.append(ev.lease)
        if len(attempts) == 1:
            raise RuntimeError("transient")

    name = f"fl{uid()}"
    await runtime(name, lambda rt: rt.subscribe(LEDGER, flaky, durable=durable))
    pub = await runtime(f"pub{uid()}")
    await pub.publish(LEDGER, ledger(f"{tag}-x"), msg_id=f"{tag}-x:opened")
    await pub.publish(LEDGER, ledger(f"{tag}-x"), msg_id=f"{tag}-x:opened")  # deduplicated
    await wait_for(lambda: len(attempts) == 2, timeout=10)
    assert attempts == [f"{tag}-x", f"{tag}-x"]
    assert sample("jobtree_handler_errors_total", service=name, subject=LEDGER.name) == 1
    assert MAX_DELIVERIES > 2


async def _poll(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- probes


async def test_health_ready_and_metrics(runtime: Factory) -> None:
    rt = await runtime(f"probe{uid()}", ready=False)
    port = rt.http_port
    assert port > 0

    assert (await http_get(port, "/healthz"))[0] == 200
    status, _, body = await http_get(port, "/readyz")
    assert status == 503 and "not ready" in body

    rt.set_ready(True)
    assert (await http_get(port, "/readyz"))[:1] == (200,)

    status, ctype, body = await http_get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "jobtree_deadletter_total" in body
    assert f'jobtree_service_info{{service="{rt.name}",version="0.1.0"}} 1.0' in body
    assert f'jobtree_nats_connected{{service="{rt.name}"}} 1.0' in body

    assert (await http_get(port, "/nope"))[0] == 404


async def test_readyz_needs_nats(nats_server: NatsServer, tmp_path: Path) -> None:
    """A runtime pointed at a dead NATS keeps retrying; /readyz says why it is not ready."""
    lonely = NatsServer(workdir=tmp_path / "nats")
    # a service's own identity: its permissions suffice to connect and register
    rt = ServiceRuntime("packer", nats_url=lonely.url, credentials=lonely.credentials("packer"))
    rt.set_ready(True)
    starting = asyncio.create_task(rt.start())
    try:
        await wait_for(lambda: rt.http_port > 0)
        status, _, body = await http_get(rt.http_port, "/readyz")
        assert status == 503 and "NATS not connected" in body
        lonely.start()  # now the server appears: start() completes by itself
        await asyncio.wait_for(starting, 15)
        await wait_ready(rt.http_port)
    finally:
        starting.cancel()
        await rt.stop()
        lonely.stop()


# --------------------------------------------------------------------------- process lifecycle

SCRIPT = """
import asyncio, sys
from shared.bus.config import BusCredentials
from shared.bus.runtime import ServiceRuntime

async def main() -> None:
    # two runtimes in one process, like the combined controller-manager: one SIGTERM stops both
    creds = BusCredentials(user=sys.argv[2], password_file=sys.argv[3])
    runtimes = [
        ServiceRuntime(name, nats_url=sys.argv[1], credentials=creds) for name in ("sig-a", "sig-b")
    ]
    for rt in runtimes:
        await rt.start()
        rt.set_ready(True)
    print(runtimes[0].http_port, flush=True)
    await asyncio.gather(*(rt.run_until_stopped() for rt in runtimes))
    print("stopped", all(rt.nc.is_closed for rt in runtimes), flush=True)

asyncio.run(main())
"""


async def test_sigterm_stops_the_process_cleanly(nats_server: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SCRIPT,
        nats_server.url,
        TESTER,
        str(nats_server.password_file(TESTER)),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert (await http_get(port, "/readyz"))[0] == 200
        os.kill(proc.pid, signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "stopped True"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_run_until_stopped_returns_after_stop(runtime: Factory) -> None:
    rt = await runtime(f"stopper{uid()}")
    waiting = asyncio.create_task(rt.run_until_stopped())
    await asyncio.sleep(0.05)
    await rt.stop()
    await asyncio.wait_for(waiting, 5)
    assert rt.nc.is_closed


async def test_dead_letter_payloads_decode_from_raw_subscription(nats_server: NatsServer) -> None:
    """The dead-letter wire format is plain JSON a raw client (e.g. `nats sub`) can read."""
    subject = echo_subject()
    rt = ServiceRuntime(
        f"raw{uid()}", nats_url=nats_server.url, credentials=nats_server.credentials(TESTER)
    )

    async def handle(ref: RunRef) -> CommitReply:
        return CommitReply(ok=True)

    rt.endpoint(subject, handle)
    await rt.start()
    nc = await nats.connect(nats_server.url, **nats_server.connect_options(TESTER))
    try:
        sub = await nc.subscribe(deadletter_of(subject).name)
        await nc.flush()
        resp = await nc.request(subject.name, b"[]", timeout=5)
        assert resp.headers["Nats-Service-Error-Code"] == "400"
        letter = decode((await sub.next_msg(timeout=5)).data, DeadLetter)
        assert letter.payload == b"[]"
    finally:
        await nc.close()
        await rt.stop()
