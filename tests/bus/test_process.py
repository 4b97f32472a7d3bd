"""The process plumbing the service entry points share: flags with environment fallbacks and the
signal-driven start/serve/stop loop (no server needed)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import pytest

from shared.bus.config import env_value, parse_service_args, truthy
from shared.bus.process import serve_until_signal


def test_env_value_falls_back_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBTREE_TEST_VALUE", raising=False)
    assert env_value("JOBTREE_TEST_VALUE", "7") == "7"
    monkeypatch.setenv("JOBTREE_TEST_VALUE", "")
    assert env_value("JOBTREE_TEST_VALUE", "7") == "7"
    monkeypatch.setenv("JOBTREE_TEST_VALUE", "9")
    assert env_value("JOBTREE_TEST_VALUE", "7") == "9"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("false", False), ("", False)],
)
def test_truthy(text: str, value: bool) -> None:
    assert truthy(text) is value


def test_own_flags_then_common_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("JOBTREE_NATS_URL", raising=False)
    parser = argparse.ArgumentParser(prog="jobtree-demo", add_help=False)
    parser.add_argument("--tick", type=float, default=1.0, help="the demo's own flag")
    ns, cfg = parse_service_args("demo", parser, ["--tick", "2", "--nats-url", "nats://x:1"])
    assert ns.tick == 2.0
    assert (cfg.name, cfg.nats_url) == ("demo", "nats://x:1")
    with pytest.raises(SystemExit) as exit_info:
        parse_service_args("demo", parser, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.index("the demo's own flag") < out.index("--nats-url")


class Calls:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.started = asyncio.Event()
        self.stopped = 0

    async def start(self) -> None:
        self.started.set()
        if self.fail:
            raise RuntimeError("no start")

    async def slow_start(self) -> None:
        self.started.set()
        await asyncio.sleep(60)

    async def stop(self) -> None:
        self.stopped += 1


async def test_a_failed_start_is_stopped_and_raised() -> None:
    calls = Calls(fail=True)
    with pytest.raises(RuntimeError, match="no start"):
        await serve_until_signal(calls.start, calls.stop)
    assert calls.stopped == 1


async def test_an_until_event_ends_serving() -> None:
    calls = Calls()
    lost = asyncio.Event()
    serving = asyncio.create_task(serve_until_signal(calls.start, calls.stop, until=[lost]))
    await calls.started.wait()
    await asyncio.sleep(0.01)
    assert not serving.done()
    lost.set()
    await asyncio.wait_for(serving, 5)
    assert calls.stopped == 1


async def test_sigterm_while_starting_stops() -> None:
    calls = Calls()
    serving = asyncio.create_task(serve_until_signal(calls.slow_start, calls.stop))
    await calls.started.wait()
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 5)
    assert calls.stopped == 1
