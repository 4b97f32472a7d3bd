"""A real local Kubernetes control plane: etcd + kube-apiserver (+ KWOK for fake nodes and pods).

Used by the test suite and by the embedded local mode. The binaries come from
``hack/testbin.sh``, which honours ``KUBEBUILDER_ASSETS`` or builds pinned versions from the Go
module proxy into a cache outside the repository.
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shared.localenv.processes import free_port, spawn, stop, wait_until

REPO = Path(__file__).resolve().parents[2]
ADMIN_USER = "jobtree-admin"


def ensure_binaries() -> Path:
    """Directory holding kube-apiserver, etcd, kubectl and kwok (built on first use)."""
    script = REPO / "hack" / "testbin.sh"
    done = subprocess.run(
        ["bash", str(script)], check=True, stdout=subprocess.PIPE, stderr=sys.stderr, text=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


def _write_service_account_keys(directory: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = directory / "sa.key"
    public = directory / "sa.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def kubeconfig_text(server: str, token: str, namespace: str = "default") -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: jobtree-local
  cluster:
    server: {server}
    insecure-skip-tls-verify: true
users:
- name: {ADMIN_USER}
  user:
    token: {token}
contexts:
- name: jobtree-local
  context:
    cluster: jobtree-local
    user: {ADMIN_USER}
    namespace: {namespace}
current-context: jobtree-local
"""


@dataclass
class ControlPlane:
    """etcd and kube-apiserver as child processes, with an admin kubeconfig."""

    workdir: Path
    bin_dir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    api_port: int = field(default_factory=free_port)
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def env(self) -> dict[str, str]:
        """Environment for child commands: our kubectl first on PATH, our kubeconfig."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_etcd(timeout)
        self._start_apiserver(timeout)

    def _start_etcd(self, timeout: float) -> None:
        data = self.workdir / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        log = self.logs / "etcd.log"
        proc = spawn(
            [
                str(self.bin_dir / "etcd"),
                "--data-dir",
                str(data),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"default={peer}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
            log,
        )
        self._procs["etcd"] = proc

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as resp:
                return b'"true"' in resp.read()

        wait_until(healthy, timeout=timeout, what="etcd", proc=proc, log=log)

    def _start_apiserver(self, timeout: float) -> None:
        secrets_dir = self.workdir / "secrets"
        secrets_dir.mkdir(exist_ok=True)
        sa_key, sa_pub = _write_service_account_keys(secrets_dir)
        tokens = secrets_dir / "tokens.csv"
        tokens.write_text(f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        log = self.logs / "kube-apiserver.log"
        proc = spawn(
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/16",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                # No controller-manager runs here: nothing would create service accounts, nor
                # lift the not-ready taint TaintNodesByCondition puts on every new node (Jobtree
                # honours NoSchedule taints, so KWOK nodes would never take a rank).
                "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--v=1",
            ],
            log,
        )
        self._procs["kube-apiserver"] = proc
        self.kubeconfig.write_text(kubeconfig_text(self.server, self.token))
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def ready() -> bool:
            request = urllib.request.Request(
                f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                return bool(resp.status == 200)

        wait_until(ready, timeout=timeout, what="kube-apiserver", proc=proc, log=log)

    def start_kwok(self, timeout: float = 30.0) -> None:
        """KWOK fakes kubelets for nodes annotated ``kwok.x-k8s.io/node=fake`` and their pods."""
        log = self.logs / "kwok.log"
        proc = spawn(
            [
                str(self.bin_dir / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.244.0.1",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
            log,
        )
        self._procs["kwok"] = proc
        wait_until(lambda: proc.poll() is None, timeout=timeout, what="kwok", proc=proc, log=log)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this control plane."""
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            input=input,
            text=True,
            capture_output=True,
            check=check,
            env=self.env(),
            timeout=timeout,
        )

    def stop(self) -> None:
        for name in ("kwok", "kube-apiserver", "etcd"):
            stop(self._procs.pop(name, None))
