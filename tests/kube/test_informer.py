"""Informer against the real API server: list, watch, resume, and relist with synthetic events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient

from shared.kube.client import make_client
from shared.kube.informer import EventType, Informer, Listener, Obj, diff, parse_event
from shared.kube.resources import RUNS
from shared.localenv.controlplane import ControlPlane, kubeconfig_text
from shared.localenv.processes import free_port
from tests.conftest import ensure_namespace

pytestmark = pytest.mark.kube
session_loop = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parents[2]
NS = "jobtree-informer-test"
SUITE = "jobtree.test/suite"


@pytest.fixture(scope="module")
def cluster(crds: ControlPlane) -> Iterator[ControlPlane]:
    """CRDs installed and a namespace of our own."""
    ensure_namespace(crds, NS)
    yield crds
    crds.kubectl("delete", "namespace", NS, "--wait=false", check=False)


@pytest.fixture(scope="module")
async def api(cluster: ControlPlane) -> AsyncIterator[ApiClient]:
    client = await make_client(str(cluster.kubeconfig))
    yield client
    await client.close()


def run_yaml(name: str, case: str, *, gpus: int = 8, labelled: bool = True) -> str:
    labels = f"{{{SUITE}: informer, case: {case}}}" if labelled else "{}"
    return f"""apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {{name: {name}, namespace: {NS}, labels: {labels}}}
spec:
  owner: org:ai:test
  resources: {{gpuType: H100-80GB, totalGPUs: {gpus}}}
"""


class Recorder:
    """A listener that remembers (event, name) pairs and the old object of each event."""

    def __init__(self) -> None:
        self.events: list[tuple[EventType, str]] = []
        self.olds: list[Obj | None] = []

    async def __call__(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        self.events.append((event, obj["metadata"]["name"]))
        self.olds.append(old)

    def clear(self) -> None:
        self.events.clear()
        self.olds.clear()


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


class Running:
    """An informer on the Runs of one test case, started in the background."""

    def __init__(self, api: ApiClient, case: str, *first: Listener) -> None:
        self.informer = Informer(api, RUNS, namespace=NS, label_selector=f"case={case}")
        self.recorder = Recorder()
        for listener in (*first, self.recorder):
            self.informer.add_listener(listener)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.informer.run())
        await asyncio.wait_for(self.informer.ready.wait(), 30)

    async def stop(self) -> None:
        self.informer.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)

    def names(self) -> set[str]:
        return {obj["metadata"]["name"] for obj in self.informer.items.values()}


def kubectl(cluster: ControlPlane, *args: str, input: str | None = None) -> None:
    cluster.kubectl(*args, input=input)


# ---------------------------------------------------------------------------- pure parts


def obj(name: str, rv: str, uid: str = "u") -> Obj:
    return {"metadata": {"name": name, "resourceVersion": rv, "uid": uid}}


def test_diff_orders_deletions_first_and_splits_recreations() -> None:
    old = {"a": obj("a", "1"), "b": obj("b", "1"), "c": obj("c", "1"), "d": obj("d", "1")}
    new = {"b": obj("b", "1"), "c": obj("c", "2"), "d": obj("d", "3", uid="v"), "e": obj("e", "1")}
    changes = [(kind, o["metadata"]["name"], prev is not None) for kind, o, prev in diff(old, new)]
    assert changes == [
        ("DELETED", "a", True),
        ("MODIFIED", "c", True),
        ("DELETED", "d", True),
        ("ADDED", "d", False),
        ("ADDED", "e", False),
    ]


@pytest.mark.parametrize("line", [b"{not json", b"[1, 2]", b'{"type": "ADDED"}', b'{"object": {}}'])
def test_malformed_watch_lines_are_skipped(line: bytes) -> None:
    assert parse_event(line) is None


def test_watch_line_is_parsed() -> None:
    assert parse_event(b'{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"7"}}}') == (
        "BOOKMARK",
        {"metadata": {"resourceVersion": "7"}},
    )


# ---------------------------------------------------------------------------- real server


@session_loop
async def test_lists_then_watches_adds_updates_and_deletes(
    cluster: ControlPlane, api: ApiClient
) -> None:
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("live-a", "live"))
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("live-other", "elsewhere"))
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("live-unlabelled", "live", labelled=False))
    crashing: list[str] = []

    def crash(event: EventType, o: Obj, old: Obj | None) -> None:
        crashing.append(event)
        raise RuntimeError("a broken listener must not stop the informer")

    running = Running(api, "live", crash)
    await running.start()
    try:
        assert running.recorder.events == [("ADDED", "live-a")]
        assert set(running.informer.items) == {f"{NS}/live-a"}
        assert running.informer.items[f"{NS}/live-a"]["kind"] == "Run"
        assert running.informer.resource_version
        kubectl(cluster, "apply", "-f", "-", input=run_yaml("live-b", "live"))
        kubectl(cluster, "apply", "-f", "-", input=run_yaml("live-a", "live", gpus=16))
        kubectl(cluster, "delete", "run", "-n", NS, "live-b")
        await eventually(lambda: len(running.recorder.events) == 4)
        assert running.recorder.events == [
            ("ADDED", "live-a"),
            ("ADDED", "live-b"),
            ("MODIFIED", "live-a"),
            ("DELETED", "live-b"),
        ]
        old = running.recorder.olds[2]
        assert old is not None and old["spec"]["resources"]["totalGPUs"] == 8
        item = running.informer.items[f"{NS}/live-a"]
        assert item["spec"]["resources"]["totalGPUs"] == 16
        # kubectl apply wrote managedFields; the cache does not keep them (listed or watched).
        assert all("managedFields" not in o["metadata"] for o in running.informer.items.values())
        assert "managedFields" not in old["metadata"]
        assert running.names() == {"live-a"}
        assert crashing == ["ADDED", "ADDED", "MODIFIED", "DELETED"]
        assert running.informer.relists == 1
    finally:
        await running.stop()


@session_loop
async def test_restart_resumes_the_watch_from_its_resource_version(
    cluster: ControlPlane, api: ApiClient
) -> None:
    for name in ("resume-a", "resume-b"):
        kubectl(cluster, "apply", "-f", "-", input=run_yaml(name, "resume"))
    running = Running(api, "resume")
    await running.start()
    await running.stop()
    running.recorder.clear()
    kubectl(cluster, "delete", "run", "-n", NS, "resume-a")
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("resume-b", "resume", gpus=16))
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("resume-c", "resume"))
    await running.start()
    try:
        await eventually(lambda: len(running.recorder.events) == 3)
        assert running.recorder.events == [
            ("DELETED", "resume-a"),
            ("MODIFIED", "resume-b"),
            ("ADDED", "resume-c"),
        ]
        assert running.informer.relists == 1, "resumed by watching, not by listing again"
    finally:
        await running.stop()


@session_loop
async def test_expired_resource_version_relists_with_synthetic_events(
    cluster: ControlPlane, api: ApiClient
) -> None:
    for name in ("gone-a", "gone-b", "gone-keep"):
        kubectl(cluster, "apply", "-f", "-", input=run_yaml(name, "gone"))
    running = Running(api, "gone")
    await running.start()
    await running.stop()
    running.recorder.clear()
    kubectl(cluster, "delete", "run", "-n", NS, "gone-a")
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("gone-b", "gone", gpus=16))
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("gone-c", "gone"))
    running.informer._rv = "1"  # long compacted away: the server answers 410 Gone
    await running.start()
    try:
        await eventually(lambda: running.informer.relists == 2)
        assert running.recorder.events == [
            ("DELETED", "gone-a"),
            ("MODIFIED", "gone-b"),
            ("ADDED", "gone-c"),
        ]
        deleted_old = running.recorder.olds[0]
        assert deleted_old is not None and deleted_old["metadata"]["name"] == "gone-a"
        assert running.names() == {"gone-b", "gone-c", "gone-keep"}
        kubectl(cluster, "delete", "run", "-n", NS, "gone-keep")
        await eventually(lambda: running.recorder.events[-1] == ("DELETED", "gone-keep"))
    finally:
        await running.stop()


@session_loop
async def test_resync_and_reconnect_while_running(cluster: ControlPlane, api: ApiClient) -> None:
    kubectl(cluster, "apply", "-f", "-", input=run_yaml("sync-a", "sync"))
    running = Running(api, "sync")
    await running.start()
    try:
        running.informer.resync()
        await eventually(lambda: running.informer.relists == 2)
        assert running.recorder.events == [("ADDED", "sync-a")], "nothing changed, nothing emitted"
        running.informer.reconnect()
        kubectl(cluster, "apply", "-f", "-", input=run_yaml("sync-b", "sync"))
        await eventually(lambda: running.names() == {"sync-a", "sync-b"})
        assert running.recorder.events == [("ADDED", "sync-a"), ("ADDED", "sync-b")]
        assert running.informer.relists == 2
    finally:
        await running.stop()


@session_loop
async def test_unreachable_server_is_retried_until_stopped(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig_text(f"https://127.0.0.1:{free_port()}", "token"))
    client = await make_client(str(config))
    informer = Informer(client, RUNS, min_backoff=0.01, max_backoff=0.05)
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.sleep(0.5)
        assert not task.done() and not informer.ready.is_set()
    finally:
        informer.stop()
        await asyncio.wait_for(task, 5)
        await client.close()
