"""The whole of Jobtree on one machine: NATS, a control plane with the seed's fleet, five services.

:func:`start_stack` is the one code path behind ``jobtree-local up`` and the end-to-end tests'
``stack`` fixture. Everything lives under one work directory: ``kubeconfig``, ``logs/`` (every
server and service), ``state.json`` (PIDs and ports of the running instance, read by
``jobtree-local env``), etcd data, certificates and the JetStream store. Each start is a fresh,
empty cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.control.tenancy import OWNERS_ANNOTATION
from shared.localenv.controlplane import REPO, ControlPlane, ensure_binaries
from shared.localenv.fleet import SEED_FLEET, fleet_manifest
from shared.localenv.natsserver import NatsServer
from shared.localenv.services import SERVICES, ServiceSet

Progress = Callable[[str], None]

STATE_FILE = "state.json"
SEED_STEPS = (
    "kubectl apply -f config/samples/budgets/budget-west-h100.yaml",
    "kubectl apply -f config/samples/budgets/budget-vision-lending.yaml",
    "kubectl apply -f config/samples/runs/run-128-groups.yaml",
    "kubectl get leases.rq.davidlangworthy.io",
)
"""The administrator guide's first steps, printed once the stack is ready."""
SAMPLE_NAMESPACES: dict[str, str] = {"default": "org:ai:rai:sys"}
"""Namespace → owner globs it is authorised for: tenancy is closed, so the namespace the samples
are applied to (kubectl's default) is annotated to speak for the samples' owner, and no other."""
SAMPLE_GPUS = 128
"""GPUs per fabric domain the samples need (run-128-groups: 96 in nv-a, 32 in nv-b)."""


def cache_dir() -> Path:
    """``$JOBTREE_CACHE``, else ``$XDG_CACHE_HOME/jobtree``, else ``~/.cache/jobtree``."""
    if os.environ.get("JOBTREE_CACHE"):
        return Path(os.environ["JOBTREE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jobtree"


def default_workdir() -> Path:
    return cache_dir() / "local"


def _quiet(_: str) -> None:
    pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (and is not a zombie, where /proc tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def read_state(workdir: Path) -> dict[str, Any] | None:
    """The ``state.json`` of the instance in ``workdir``, if one was ever started there."""
    path = workdir / STATE_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def running_state(workdir: Path) -> dict[str, Any] | None:
    """The state of a live instance in ``workdir`` (its owner process still runs), else None."""
    state = read_state(workdir)
    if state is None or state.get("stoppedAt") or not state.get("ready"):
        return None
    return state if pid_alive(int(state["pid"])) else None


def env_lines(state: dict[str, Any]) -> list[str]:
    """Shell lines that point kubectl (the real one we built) and NATS clients at an instance.

    PATH gets the control-plane binaries (kubectl) and this installation's scripts directory
    (the venv's ``bin/``: ``kubectl-runs``, so ``kubectl runs`` works, and ``jobtree-local``).
    """
    dirs = [d for d in (state.get("binDir"), state.get("scriptsDir")) if d]
    return [
        f"export KUBECONFIG={state['kubeconfig']}",
        f'export PATH={":".join(dict.fromkeys(dirs))}:"$PATH"',
        f"export JOBTREE_NATS_URL={state['natsUrl']}",
    ]


@dataclass
class LocalStack:
    """One local Jobtree: nats-server, etcd + kube-apiserver + KWOK, the fleet, five services."""

    workdir: Path
    nodes_per_domain: int = 16
    gpus_per_node: int = 8
    log_level: str = "INFO"
    progress: Progress = _quiet
    bin_dir: Path | None = None
    otlp_endpoint: str | None = None
    """Services export traces here (``$OTEL_EXPORTER_OTLP_ENDPOINT``); None: as the environment."""
    nats: NatsServer | None = None
    plane: ControlPlane | None = None
    _services: ServiceSet | None = None

    # ---- accessors -------------------------------------------------------------------------

    @property
    def control_plane(self) -> ControlPlane:
        if self.plane is None:
            raise RuntimeError("the control plane is not running")
        return self.plane

    @property
    def services(self) -> ServiceSet:
        if self._services is None:
            raise RuntimeError("the services are not running")
        return self._services

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def nats_url(self) -> str:
        if self.nats is None:
            raise RuntimeError("nats-server is not running")
        return self.nats.url

    @property
    def node_names(self) -> list[str]:
        return [
            f"{prefix}-{i:02d}"
            for prefix, _ in SEED_FLEET
            for i in range(1, self.nodes_per_domain + 1)
        ]

    def env(self) -> dict[str, str]:
        """Environment for commands against this stack: real kubectl first on PATH."""
        env = self.control_plane.env()
        env["JOBTREE_NATS_URL"] = self.nats_url
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this stack (from the repository root)."""
        return subprocess.run(
            [str(self.control_plane.bin_dir / "kubectl"), *args],
            input=input,
            text=True,
            capture_output=True,
            check=check,
            env=self.env(),
            cwd=REPO,
            timeout=timeout,
        )

    def kubectl_json(self, *args: str, timeout: float = 60.0) -> Any:
        """``kubectl <args> -o json``, decoded."""
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    # ---- lifecycle -------------------------------------------------------------------------

    def up(self, ready_timeout: float = 120.0) -> None:
        """Start everything in order; on failure the caller stops what started (:meth:`down`)."""
        say = self.progress
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._claim_workdir()
        say(
            "checking the control-plane binaries (kube-apiserver, etcd, kubectl, kwok); the first "
            "run builds them from the Go module proxy, which takes several minutes"
        )
        self.bin_dir = self.bin_dir or ensure_binaries()

        say("starting nats-server with JetStream and one NATS user per service")
        self.nats = NatsServer(workdir=self.workdir / "nats")
        shutil.rmtree(self.nats.workdir / "jetstream", ignore_errors=True)
        shutil.rmtree(self.nats.workdir / "credentials", ignore_errors=True)  # fresh passwords
        self.nats.start()
        link = self.logs / "nats-server.log"
        with contextlib.suppress(OSError):
            link.symlink_to(self.nats.workdir / "nats-server.log")
        self._write_state(ready=False)

        say("starting etcd and kube-apiserver")
        self.plane = ControlPlane(workdir=self.workdir, bin_dir=self.bin_dir)
        self.plane.start()
        self._write_state(ready=False)
        say("starting KWOK (fake kubelets for the GPU nodes)")
        self.plane.start_kwok()
        self._write_state(ready=False)

        say("installing the Jobtree CRDs")
        self.install_crds()
        say(
            f"creating the fleet: {len(self.node_names)} KWOK nodes "
            f"({self.nodes_per_domain} per fabric domain, {self.gpus_per_node} GPUs each)"
        )
        if self.nodes_per_domain * self.gpus_per_node < SAMPLE_GPUS:
            say(
                f"note: {self.nodes_per_domain * self.gpus_per_node} GPUs per domain is less "
                f"than the {SAMPLE_GPUS} the 128-GPU samples are written for"
            )
        self.create_fleet()
        say(
            "authorising the samples' namespace: "
            + ", ".join(f"{ns} for {globs}" for ns, globs in SAMPLE_NAMESPACES.items())
        )
        self.authorise_namespaces(SAMPLE_NAMESPACES)

        self._services = ServiceSet(
            self.workdir,
            nats_url=self.nats.url,
            kubeconfig=self.kubeconfig,
            log_level=self.log_level,
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint} if self.otlp_endpoint else None,
            bus_env=self.nats.service_env,
        )
        say(f"starting the services: {', '.join(self._services.names)}")
        self._services.start()
        self._write_state(ready=False)
        say("waiting for every service's /readyz")
        self._services.wait_ready(ready_timeout)
        self._write_state(ready=True)

    def _claim_workdir(self) -> None:
        """Refuse a workdir another live instance uses; clean up after one that was killed."""
        state = read_state(self.workdir)
        if state is not None and not state.get("stoppedAt"):
            owner = int(state.get("pid", 0))
            if owner and owner != os.getpid() and pid_alive(owner):
                raise RuntimeError(
                    f"another jobtree-local (pid {owner}) uses {self.workdir}; stop it with "
                    f"`jobtree-local down --workdir {self.workdir}` or pick another --workdir"
                )
            self._reap_orphans(state)
        if self.logs.exists():
            previous = self.workdir / "logs.previous"
            shutil.rmtree(previous, ignore_errors=True)
            self.logs.rename(previous)
        self.logs.mkdir(parents=True)

    def _reap_orphans(self, state: dict[str, Any]) -> None:
        """Kill children a killed instance left behind (only processes naming this workdir)."""
        for name, pid in state.get("processes", {}).items():
            if pid_alive(int(pid)) and str(self.workdir) in _cmdline(int(pid)):
                self.progress(f"stopping {name} (pid {pid}) left over from an earlier instance")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def install_crds(self, timeout: float = 60.0) -> None:
        """``kubectl apply`` crds/ and wait until every Jobtree CRD is Established."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        self.kubectl(
            "wait",
            "--for=condition=established",
            f"--timeout={timeout:.0f}s",
            "crd",
            "-l",
            "app.kubernetes.io/part-of=jobtree",
            timeout=timeout + 30,
        )

    def create_fleet(self, timeout: float = 120.0) -> None:
        """The seed's nodes with its labels (``gpu-a-NN`` in nv-a, ``gpu-b-NN`` in nv-b), Ready."""
        for prefix, labels in SEED_FLEET:
            manifest = fleet_manifest(
                prefix, self.nodes_per_domain, labels, gpus=self.gpus_per_node
            )
            self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        self.kubectl(
            "wait",
            "--for=condition=Ready",
            f"--timeout={timeout:.0f}s",
            *(f"node/{name}" for name in self.node_names),
            timeout=timeout + 30,
        )

    def authorise_namespaces(self, namespaces: dict[str, str]) -> None:
        """Create each namespace if absent and annotate it with the owner globs it may name."""
        for name, globs in namespaces.items():
            doc = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "annotations": {OWNERS_ANNOTATION: globs}},
            }
            self.kubectl(
                "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(doc)
            )

    def processes(self) -> dict[str, int]:
        """PID of every child process, by name."""
        pids: dict[str, int] = {}
        nats_proc = getattr(self.nats, "_proc", None)
        if nats_proc is not None:
            pids["nats-server"] = nats_proc.pid
        if self.plane is not None:
            pids.update({name: p.pid for name, p in getattr(self.plane, "_procs", {}).items()})
        if self._services is not None:
            pids.update(self._services.pids())
        return pids

    def ports(self) -> dict[str, int]:
        """Every port the stack listens on, by what listens."""
        ports: dict[str, int] = {}
        if self.nats is not None:
            ports["nats"] = self.nats.port
            ports["nats-monitor"] = self.nats.monitor_port
        if self.plane is not None:
            ports["kube-apiserver"] = self.plane.api_port
            ports["etcd"] = self.plane.etcd_port
        if self._services is not None:
            ports.update(self._services.ports())
        return ports

    def state(self, *, ready: bool) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "ready": ready,
            "startedAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "natsUrl": self.nats.url if self.nats is not None else None,
            "binDir": str(self.bin_dir) if self.bin_dir is not None else None,
            "scriptsDir": sysconfig.get_path("scripts"),
            "logs": str(self.logs),
            "nodesPerDomain": self.nodes_per_domain,
            "processes": self.processes(),
            "ports": self.ports(),
        }

    def _write_state(self, *, ready: bool) -> None:
        path = self.workdir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(ready=ready), indent=2) + "\n")
        tmp.replace(path)

    def exited(self) -> dict[str, int | None]:
        """Child processes that have ended, with their exit codes (a healthy stack: empty)."""
        gone: dict[str, int | None] = {}
        nats_proc: subprocess.Popen[bytes] | None = getattr(self.nats, "_proc", None)
        if nats_proc is not None and nats_proc.poll() is not None:
            gone["nats-server"] = nats_proc.returncode
        if self.plane is not None:
            procs: dict[str, subprocess.Popen[bytes]] = getattr(self.plane, "_procs", {})
            gone.update({n: p.returncode for n, p in procs.items() if p.poll() is not None})
        if self._services is not None:
            gone.update(self._services.exited())
        return gone

    def down(self) -> None:
        """Stop the services, then KWOK, kube-apiserver, etcd and nats-server; idempotent."""
        say = self.progress
        if self._services is not None and self._services.pids().keys() - self._services.exited():
            say("stopping the services")
        if self._services is not None:
            self._services.stop()
        if self.plane is not None and set(getattr(self.plane, "_procs", {})):
            say("stopping KWOK, kube-apiserver and etcd")
        if self.plane is not None:
            self.plane.stop()
        if self.nats is not None and getattr(self.nats, "_proc", None) is not None:
            say("stopping nats-server")
        if self.nats is not None:
            self.nats.stop()
        path = self.workdir / STATE_FILE
        state = read_state(self.workdir)
        if state is not None and int(state.get("pid", 0)) == os.getpid():
            state["stoppedAt"] = datetime.now(UTC).isoformat(timespec="seconds")
            state["ready"] = False
            path.write_text(json.dumps(state, indent=2) + "\n")

    # ---- what to tell the user -------------------------------------------------------------

    def instructions(self) -> str:
        """The ready banner: exports, the seed's first commands, logs, how to stop."""
        state = self.state(ready=True)
        logs = self.logs
        names = [f"{prefix}-01..{self.nodes_per_domain:02d}" for prefix, _ in SEED_FLEET]
        secrets = self.workdir / "nats" / "credentials"
        domains = [labels["fabric.domain"] for _, labels in SEED_FLEET]
        lines = [
            "",
            f"Jobtree is running locally: {len(self.node_names)} fake H100-80GB nodes "
            f"({names[0]} in {domains[0]}, {names[1]} in {domains[1]}, "
            f"{self.gpus_per_node} GPUs each), five services, NATS at {self.nats_url}.",
            "",
            "In another shell:",
            *(f"  {line}" for line in env_lines(state)),
            f'  # or: eval "$({Path(sysconfig.get_path("scripts")) / "jobtree-local"} env'
            f' --workdir {self.workdir})"',
            "",
            "Then, from the repository root, the administrator guide's steps:",
            f"  cd {REPO}",
            *(f"  {step}" for step in SEED_STEPS),
            "  kubectl get jobtree -A",
            "",
            "Tenancy is closed: "
            + ", ".join(
                f"namespace {ns} may name owners {g}" for ns, g in SAMPLE_NAMESPACES.items()
            )
            + "; no other namespace may name any owner. To authorise another:",
            "  kubectl create namespace team-a",
            f"  kubectl annotate namespace team-a {OWNERS_ANNOTATION}='org:ai:*'",
            "",
            f"Logs: {logs}/ — one JSON line per event in "
            + ", ".join(f"{n}.log" for n in SERVICES)
            + "; kube-apiserver.log, etcd.log, kwok.log, nats-server.log beside them.",
            "Probes: " + ", ".join(f"{n} {self.services.url(n)}/metrics" for n in SERVICES),
            f"NATS: one user per service, no anonymous access (passwords in {secrets}/; "
            f"permissions: jobtree-nats-auth). Read-only nats CLI: nats -s {self.nats_url} "
            f'--user operator --password "$(cat {secrets}/operator.password)" '
            "--inbox-prefix _INBOX.operator stream ls",
            "Stop with Ctrl-C (or `jobtree-local down`): everything started here is shut down.",
        ]
        return "\n".join(lines)


def start_stack(
    workdir: Path,
    *,
    nodes_per_domain: int = 16,
    gpus_per_node: int = 8,
    log_level: str = "INFO",
    ready_timeout: float = 120.0,
    progress: Progress = _quiet,
    otlp_endpoint: str | None = None,
) -> LocalStack:
    """Bring up a whole local Jobtree in ``workdir`` and return it ready (services /readyz)."""
    stack = LocalStack(
        workdir=workdir.resolve(),
        nodes_per_domain=nodes_per_domain,
        gpus_per_node=gpus_per_node,
        log_level=log_level,
        progress=progress,
        otlp_endpoint=otlp_endpoint,
    )
    try:
        stack.up(ready_timeout)
    except BaseException:
        stack.down()
        raise
    return stack


@contextlib.contextmanager
def running_stack(workdir: Path, **options: Any) -> Iterator[LocalStack]:
    """:func:`start_stack` as a context manager that always shuts the stack down."""
    stack = start_stack(workdir, **options)
    try:
        yield stack
    finally:
        stack.down()
