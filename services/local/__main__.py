"""``jobtree-local``: run all of Jobtree on this machine, in the foreground, until Ctrl-C.

``jobtree-local up`` (the default) starts nats-server, etcd + kube-apiserver + KWOK with the
administrator guide's fleet, the CRDs and the five services, prints how to use them and stops
everything on SIGINT/SIGTERM. ``jobtree-local env`` prints the export lines of a running
instance; ``jobtree-local down`` asks a running instance to stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from services.local.stack import (
    LocalStack,
    default_workdir,
    env_lines,
    pid_alive,
    read_state,
    running_state,
)


class _Stop(Exception):
    """A stop signal arrived."""


def _say(message: str) -> None:
    print(f"jobtree-local: {message}", flush=True)


def _stop_on_signals() -> None:
    """The first SIGINT/SIGTERM raises :class:`_Stop` in the main thread; later ones are ignored."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _supervise(stack: LocalStack) -> None:
    """Until a signal: report (once) any child process that dies."""
    reported: set[str] = set()
    while True:
        for name, code in stack.exited().items():
            if name not in reported:
                reported.add(name)
                _say(f"warning: {name} exited with code {code}; see {stack.logs / name}.log")
        time.sleep(1.0)


def up(args: argparse.Namespace) -> int:
    """Start everything, print the instructions, wait for a signal, stop everything."""
    workdir = Path(args.workdir).expanduser().resolve()
    stack = LocalStack(
        workdir=workdir,
        nodes_per_domain=args.nodes_per_domain,
        gpus_per_node=args.gpus_per_node,
        log_level=args.log_level,
        progress=_say,
    )
    _stop_on_signals()
    ready = False
    code = 0
    try:
        _say(f"starting in {workdir} (kubeconfig, logs and state live there)")
        stack.up(args.ready_timeout)
        ready = True
        print(stack.instructions(), flush=True)
        _say("ready")
        _supervise(stack)
    except _Stop as stop:
        _say(f"{stop} received, shutting down")
        code = 0 if ready else 130
    except Exception as err:
        _say(f"failed: {err}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.down()
        _say("stopped; nothing started here is left running")
    return code


def env(args: argparse.Namespace) -> int:
    """Print ``export`` lines for the instance running in the workdir."""
    workdir = Path(args.workdir).expanduser().resolve()
    state = running_state(workdir)
    if state is None:
        print(f"jobtree-local: no running instance in {workdir}", file=sys.stderr)
        return 1
    print("\n".join(env_lines(state)))
    return 0


def down(args: argparse.Namespace) -> int:
    """SIGTERM the instance running in the workdir and wait until it has shut down."""
    workdir = Path(args.workdir).expanduser().resolve()
    state = read_state(workdir)
    pid = int(state["pid"]) if state and not state.get("stoppedAt") else 0
    if not pid or not pid_alive(pid):
        print(f"jobtree-local: no running instance in {workdir}", file=sys.stderr)
        return 1
    _say(f"stopping the instance (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            print(
                f"jobtree-local: pid {pid} still running after {args.timeout:.0f}s", file=sys.stderr
            )
            return 1
        time.sleep(0.2)
    _say("stopped")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="jobtree-local",
        description="All of Jobtree on this machine: NATS, a local control plane with fake GPU "
        "nodes, the CRDs and the five services. Default command: up.",
    )
    sub = top.add_subparsers(dest="command", metavar="{up,env,down}")
    workdir = argparse.ArgumentParser(add_help=False)
    workdir.add_argument(
        "--workdir",
        default=str(default_workdir()),
        help="state directory: kubeconfig, logs, state.json (default %(default)s)",
    )
    p_up = sub.add_parser("up", parents=[workdir], help="start everything (foreground)")
    p_up.add_argument(
        "--nodes-per-domain",
        type=int,
        default=16,
        help="KWOK nodes per fabric domain (gpu-a-NN, gpu-b-NN; default %(default)s)",
    )
    p_up.add_argument("--gpus-per-node", type=int, default=8, help="default %(default)s")
    p_up.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the services' /readyz (default %(default)s)",
    )
    p_up.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="service log level (default %(default)s)",
    )
    p_up.set_defaults(func=up)
    p_env = sub.add_parser("env", parents=[workdir], help="print export lines for a running one")
    p_env.set_defaults(func=env)
    p_down = sub.add_parser("down", parents=[workdir], help="stop a running instance")
    p_down.add_argument("--timeout", type=float, default=90.0, help="default %(default)s")
    p_down.set_defaults(func=down)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jobtree-local`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "up")
    args = parser().parse_args(args_list)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
