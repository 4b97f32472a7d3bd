"""The real ``jobtree-local`` command: up, the administrator guide's steps, Ctrl-C, nothing left.

Runs the installed console script (``.venv/bin/jobtree-local``; ``python -m services.local`` when
the package's scripts are not installed) as a subprocess in a temporary ``--workdir``, drives it
with the real kubectl it puts on the printed PATH, then sends SIGINT and checks that every process
it started is gone and every port it listened on is closed. The last test exercises the
:class:`~shared.localenv.services.ServiceSet` handles fault tests use, on the shared ``stack``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.local.stack import SEED_STEPS, LocalStack, pid_alive

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "jobtree-local: ready"
FRESH_PATH = "/usr/local/bin:/usr/bin:/bin"
STARTUP_TIMEOUT = 900.0  # the first run on a machine may build the control-plane binaries


def local_command() -> list[str]:
    script = Path(sys.executable).parent / "jobtree-local"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.local"]


@dataclass
class LocalMode:
    """A ``jobtree-local up`` subprocess and everything it printed."""

    workdir: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} after {timeout:.0f}s:\n" + self.output())
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"jobtree-local exited ({self.proc.wait()}) before {text!r}:\n" + self.output()
                )
            self.lines.append(line)
            if text in line:
                return

    def drain(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return
            self.lines.append(line)

    def output(self) -> str:
        return "\n".join(self.lines)

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.workdir / "state.json").read_text())
        return data

    def shell_env(self) -> dict[str, str]:
        """The environment of a fresh second shell (system PATH only: no venv, no kubectl)
        after running the printed ``export`` lines in a real bash."""
        exports = [ln.strip() for ln in self.lines if ln.strip().startswith("export ")]
        base = {"HOME": os.environ.get("HOME", "/root"), "PATH": FRESH_PATH}
        if "PYTHONPATH" in os.environ:  # the checkout under test, when it is not the installed one
            base["PYTHONPATH"] = os.environ["PYTHONPATH"]
        done = subprocess.run(
            ["bash", "-c", "\n".join([*exports, "env -0"])],
            env=base,
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)

    def sh(self, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a printed command line (``kubectl …``) from the repository root."""
        return subprocess.run(
            command.split(),
            env=self.shell_env(),
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMode]:
    workdir = tmp_path_factory.mktemp("jobtree-local")
    proc = subprocess.Popen(
        [*local_command(), "up", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    mode = LocalMode(workdir=workdir, proc=proc)
    threading.Thread(target=mode.pump, daemon=True).start()
    try:
        mode.wait_for_line(READY_LINE, STARTUP_TIMEOUT)
        yield mode
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_up_prints_how_to_use_it(local: LocalMode) -> None:
    out = local.output()
    assert f"export KUBECONFIG={local.workdir}/kubeconfig" in out
    for step in SEED_STEPS:
        assert step in out
    assert f"{local.workdir}/logs" in out
    state = local.state()
    assert state["ready"] is True
    assert state["pid"] == local.proc.pid
    assert (local.workdir / "kubeconfig").exists()
    # `jobtree-local env` prints the same export lines for the running instance.
    env = subprocess.run(
        [*local_command(), "env", "--workdir", str(local.workdir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"export KUBECONFIG={local.workdir}/kubeconfig" in env.stdout
    assert f"export JOBTREE_NATS_URL={state['natsUrl']}" in env.stdout


def test_printed_path_gives_the_real_kubectl_and_the_seed_fleet(local: LocalMode) -> None:
    env = local.shell_env()
    assert shutil.which("kubectl-runs", path=env["PATH"]) is not None, env["PATH"]
    plugin = local.sh("kubectl runs version -o json")  # the plugin found through the PATH
    assert plugin.returncode == 0, plugin.stderr
    assert json.loads(plugin.stdout)["api"] == ["rq.davidlangworthy.io/v1"]
    version = local.sh("kubectl version -o json")
    assert version.returncode == 0, version.stderr
    assert json.loads(version.stdout)["serverVersion"]["gitVersion"].startswith("v1.")
    nodes = local.sh("kubectl get nodes -l fabric.domain=nv-a,cluster=gpu-a,rack=r01 -o name")
    assert len(nodes.stdout.split()) == 16, nodes.stdout + nodes.stderr
    nodes = local.sh("kubectl get nodes -l fabric.domain=nv-b,cluster=gpu-b,rack=r09 -o name")
    assert len(nodes.stdout.split()) == 16, nodes.stdout + nodes.stderr
    crds = local.sh("kubectl get crd -l app.kubernetes.io/part-of=jobtree -o name")
    assert len(crds.stdout.split()) == 4, crds.stdout + crds.stderr


def test_seed_steps_make_leases_appear(local: LocalMode) -> None:
    applies = [s for s in SEED_STEPS if s.startswith("kubectl apply")]
    assert len(applies) == 3
    for step in applies:
        done = local.sh(step)
        assert done.returncode == 0, f"{step}: {done.stderr}"

    deadline = time.monotonic() + 120
    while True:
        got = local.sh("kubectl get leases.rq.davidlangworthy.io -o json")
        assert got.returncode == 0, got.stderr
        items = json.loads(got.stdout)["items"]
        if items:
            break
        if time.monotonic() > deadline:
            run = local.sh("kubectl get runs.rq.davidlangworthy.io run-128-groups -o yaml")
            raise AssertionError(f"no Leases after 120s; the Run:\n{run.stdout}")
        time.sleep(1)
    table = local.sh("kubectl get leases.rq.davidlangworthy.io")
    assert "run-128-groups" in table.stdout, table.stdout


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _processes_naming(text: str) -> list[str]:
    """Live processes whose command line mentions ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd and pid_alive(int(entry.name)):
            found.append(f"{entry.name}: {cmd}")
    return found


def test_sigint_stops_everything(local: LocalMode) -> None:
    state = local.state()
    children = state["processes"]
    assert set(children) >= {
        "nats-server",
        "etcd",
        "kube-apiserver",
        "kwok",
        "admission",
        "packer",
        "forecast",
        "resolver",
        "binder",
    }, children
    assert all(pid_alive(pid) for pid in children.values()), children

    local.proc.send_signal(signal.SIGINT)
    code = local.proc.wait(120)
    local.drain()
    assert code == 0, local.output()
    assert "stopped" in local.lines[-1], local.output()

    alive = {name: pid for name, pid in children.items() if pid_alive(pid)}
    assert not alive, f"still running after jobtree-local exited: {alive}"
    open_ports = {name: port for name, port in state["ports"].items() if _listening(port)}
    assert not open_ports, f"still listening: {open_ports}"
    if Path("/proc").is_dir():
        assert not _processes_naming(str(local.workdir)), _processes_naming(str(local.workdir))
    assert local.state().get("stoppedAt")
    gone = subprocess.run(
        [*local_command(), "env", "--workdir", str(local.workdir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1, gone.stdout


def test_service_set_kills_restarts_and_scrapes(stack: LocalStack) -> None:
    """The fault-test handles of the shared stack: kill, restart, readiness, metrics, logs."""
    services = stack.services
    before = services.pids()["packer"]
    assert services.kill("packer") == -signal.SIGKILL
    assert services.readiness("packer") is not None
    restarted = services.restart("packer")
    assert restarted.pid != before
    assert restarted.port == services.ports()["packer"]
    services.wait_ready(60)
    assert "# TYPE" in services.metrics("packer")
    first = services.log_path("packer").read_text().splitlines()[0]
    assert json.loads(first)["service"] == "packer"
