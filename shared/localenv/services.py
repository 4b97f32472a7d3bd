"""The five Jobtree services as real child processes, for the local mode and end-to-end tests.

Each service runs as ``python -m services.<name>`` in its own process group with its own
``--http-port`` (a free loopback port), the NATS URL, its own NATS identity (``bus_env``: the
user and password file of that service) and the kubeconfig, and writes JSON log lines to
``<workdir>/logs/<name>.log``. :class:`ServiceSet` starts them, waits for every ``/readyz``,
scrapes ``/metrics``, restarts or kills one (fault tests) and stops them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.bus.subjects import SERVICES
from shared.localenv.processes import free_port, tail

__all__ = ["SERVICES", "ServiceProcess", "ServiceSet"]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    """One running service: its process, probe port and log file."""

    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET; HTTP errors are answers too (``/readyz`` says 503 when not)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode(errors="replace")


class ServiceSet:
    """Start, probe, restart, kill and stop the Jobtree service processes."""

    def __init__(
        self,
        workdir: Path,
        *,
        nats_url: str,
        kubeconfig: Path,
        names: Iterable[str] = SERVICES,
        log_level: str = "INFO",
        env: Mapping[str, str] | None = None,
        bus_env: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.nats_url = nats_url
        self.kubeconfig = kubeconfig
        self.names: tuple[str, ...] = tuple(names)
        unknown = set(self.names) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services {sorted(unknown)}; known: {', '.join(SERVICES)}")
        self.log_level = log_level
        self.extra_env = dict(env or {})
        self.bus_env = bus_env
        """The environment holding one service's NATS credentials (``NatsServer.service_env``)."""
        self._procs: dict[str, ServiceProcess] = {}

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def log_path(self, name: str) -> Path:
        """``<workdir>/logs/<name>.log``: the service's JSON lines (appended across restarts)."""
        return self.logs / f"{name}.log"

    def process(self, name: str) -> ServiceProcess:
        """The running (or last started) process of service ``name``."""
        try:
            return self._procs[name]
        except KeyError:
            raise KeyError(f"service {name!r} was not started") from None

    def url(self, name: str) -> str:
        """Base URL of the service's ``/healthz``, ``/readyz`` and ``/metrics``."""
        return self.process(name).url

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items()}

    def ports(self) -> dict[str, int]:
        return {name: p.port for name, p in self._procs.items()}

    def command(self, name: str, port: int) -> list[str]:
        """The exact command line of one service process."""
        return [
            sys.executable,
            "-m",
            f"services.{name}",
            f"--nats-url={self.nats_url}",
            f"--kubeconfig={self.kubeconfig}",
            f"--http-port={port}",
            f"--log-level={self.log_level}",
            "--log-format=json",
        ]

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "JOBTREE_NATS_URL": self.nats_url,
                "KUBECONFIG": str(self.kubeconfig),
            }
        )
        # Run from the checkout even when the package is not installed in this interpreter.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.update(self.extra_env)
        if self.bus_env is not None:
            env.update(self.bus_env(name))
        return env

    def _spawn(self, name: str, port: int | None = None) -> ServiceProcess:
        port = port or free_port()
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                self.command(name, port),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=self._env(name),
                start_new_session=True,
            )
        self._procs[name] = ServiceProcess(name=name, port=port, log=log, proc=proc)
        return self._procs[name]

    def start(self) -> None:
        """Start every service that is not running (does not wait: see :meth:`wait_ready`)."""
        for name in self.names:
            current = self._procs.get(name)
            if current is None or not current.alive():
                self._spawn(name)

    def readiness(self, name: str) -> str | None:
        """``None`` when ``/readyz`` answers 200, else why not (exit, refused, the 503 body)."""
        proc = self.process(name)
        if not proc.alive():
            return f"exited with {proc.proc.returncode}"
        try:
            status, body = _get(f"{proc.url}/readyz")
        except OSError as err:
            return f"/readyz unreachable: {err}"
        return None if status == 200 else f"/readyz {status}: {body.strip()}"

    def wait_ready(self, timeout: float = 60.0, names: Iterable[str] | None = None) -> None:
        """Poll every service's ``/readyz`` until all answer 200.

        Fails at once, with the log tail, when a service exits; on timeout the error names each
        service that is not ready and why.
        """
        pending = list(self.names if names is None else names)
        deadline = time.monotonic() + timeout
        reasons: dict[str, str] = {}
        while pending:
            for name in list(pending):
                reason = self.readiness(name)
                if reason is None:
                    pending.remove(name)
                    continue
                reasons[name] = reason
                if not self.process(name).alive():
                    raise RuntimeError(
                        f"service {name} {reason}; {self.log_path(name)}:\n"
                        f"{tail(self.log_path(name))}"
                    )
            if not pending:
                return
            if time.monotonic() > deadline:
                detail = "\n".join(
                    f"  {n}: {reasons.get(n)}; {self.log_path(n)}:\n{tail(self.log_path(n), 10)}"
                    for n in pending
                )
                raise TimeoutError(f"services not ready after {timeout:.0f}s:\n{detail}")
            time.sleep(0.25)

    def metrics(self, name: str) -> str:
        """The Prometheus text of the service's ``/metrics``."""
        status, body = _get(f"{self.url(name)}/metrics", timeout=5.0)
        if status != 200:
            raise RuntimeError(f"{name} /metrics answered {status}: {body[:200]}")
        return body

    def _signal(self, proc: ServiceProcess, sig: int) -> None:
        """Signal the service's whole process group (it leads its own session)."""
        if not proc.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _stop_one(self, proc: ServiceProcess, grace: float) -> None:
        self._signal(proc, signal.SIGTERM)
        try:
            proc.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)
            proc.proc.wait(grace)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` to one service (SIGKILL: a crash); returns its exit code once it is gone.

        For a signal that does not end the process (e.g. SIGSTOP) returns ``None`` at once.
        """
        proc = self.process(name)
        self._signal(proc, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            return proc.proc.wait(30.0)
        return proc.proc.poll()

    def restart(self, name: str, *, grace: float = 10.0, keep_port: bool = True) -> ServiceProcess:
        """Stop one service (SIGTERM, SIGKILL after ``grace``) and start it again.

        Does not wait for readiness: call ``wait_ready(names=[name])``.
        """
        old = self.process(name)
        self._stop_one(old, grace)
        return self._spawn(name, old.port if keep_port else None)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service at once, SIGKILL those still running after ``grace`` seconds."""
        running = [p for p in self._procs.values() if p.alive()]
        for proc in running:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.proc.wait(10.0)

    def exited(self) -> dict[str, int]:
        """Services whose process has ended, with the exit code."""
        return {
            name: p.proc.returncode
            for name, p in self._procs.items()
            if p.proc.poll() is not None and p.proc.returncode is not None
        }
