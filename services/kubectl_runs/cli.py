"""The `kubectl runs` command tree and the process entry, light so `--help` and TAB are fast.

Only argparse and the pure completion/output modules are imported here. A handler is named as
``module:function`` (a module of this package) and imported when it runs, so the API client,
the pydantic models and the engine load only for commands that talk to the cluster —
``kubectl runs --help`` and kubectl's completion requests never pay for them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from importlib import import_module
from typing import Any, NoReturn, TextIO

from services.kubectl_runs import completion, output

PACKAGE = "services.kubectl_runs"
EXIT_CODES = """Exit status:
  0  success (watch: the Run Completed)
  1  an error (one line on stderr)
  2  a bad command line
  3  watch: the Run Failed
  4  watch: the Run was deleted
  5  watch: --timeout passed first
  130 interrupted (watch: 0)"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like the rest of the CLI's errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """kubectl's connection and output flags, accepted before or after the subcommand."""
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("kubectl options")
    group.add_argument("--kubeconfig", metavar="FILE", default=default, help="kubeconfig file")
    group.add_argument(
        "--context", metavar=completion.CONTEXT_METAVAR, default=default, help="kubeconfig context"
    )
    group.add_argument(
        "-n",
        "--namespace",
        metavar=completion.NAMESPACE_METAVAR,
        default=default,
        help="namespace (default: the context's)",
    )
    group.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="every namespace (list), or find the Run in any namespace (RUN may be NS/NAME)",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=output.FORMATS,
        metavar="FORMAT",
        default="table" if top else argparse.SUPPRESS,
        help="table|wide|json|yaml|name|jsonpath=TEMPLATE|custom-columns=SPEC",
    )
    group.add_argument(
        "--no-headers",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="omit table headers (table, wide, custom-columns)",
    )
    group.add_argument(
        "--request-timeout",
        metavar="DURATION",
        default="0" if top else argparse.SUPPRESS,
        help="time to wait for each server request: 30s, 2m, 1h; 0 waits up to 30s (default 0)",
    )


def _command(
    subs: argparse._SubParsersAction[Parser],
    name: str,
    help_text: str,
    handler: str | None,
    examples: str = "",
) -> Parser:
    """A subcommand; ``handler`` is ``module:function`` in this package, imported when run."""
    epilog = "Examples:\n" + examples.strip("\n") if examples else None
    parser = subs.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _globals(parser, top=False)
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def _run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar=completion.RUN_METAVAR, help="Run name or NAMESPACE/NAME")


def _selector(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-l", "--selector", metavar="SELECTOR", help="label selector, e.g. team=nlp,tier!=batch"
    )


def build_parser() -> Parser:
    """The whole command tree (completions are generated from it)."""
    parser = Parser(
        prog="kubectl runs",
        description="Plan, watch and explain Jobtree Runs, budgets and leases.",
        epilog="Examples:\n"
        "  kubectl runs list                      # my namespace's Runs\n"
        "  kubectl runs submit -f run.yaml\n"
        "  kubectl runs plan my-run               # why it waits, and until when\n"
        "  kubectl runs cancel my-run\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _globals(parser, top=True)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(
        subs,
        "list",
        "Runs with phase, reason, width and ETA (like squeue)",
        "listing:cmd_list",
        """
  kubectl runs list                         # the current namespace
  kubectl runs list -A --phase Reserved --sort eta
  kubectl runs list --owner org:ai -o wide  # adds funding and fabric domains
  kubectl runs list -o name | xargs -n1 kubectl runs plan
  kubectl runs list -o custom-columns=NAME:.name,GPUS:.width.allocated --no-headers""",
    )
    _selector(p)
    p.add_argument(
        "--owner", help="owner, with those below it in the budget tree, or a glob (lab:*)"
    )
    p.add_argument("--phase", action="append", metavar="PHASE", help="only this phase (repeatable)")
    p.add_argument(
        "--sort",
        choices=("name", "eta", "age", "gpus"),
        default="name",
        help="name (default), eta (soonest first), age (oldest first), gpus (widest first)",
    )

    p = _command(
        subs,
        "submit",
        "validate manifests and server-side apply them",
        "commands:cmd_submit",
        """
  kubectl runs submit -f run.yaml
  kubectl runs submit -f runs/ -R            # every .yaml/.yml/.json below runs/
  kubectl runs submit -f run.yaml --dry-run=server
  cat run.yaml | kubectl runs submit -f -""",
    )
    p.add_argument(
        "-f",
        "--filename",
        metavar=completion.FILE_METAVAR,
        action="append",
        required=True,
        help="YAML/JSON file, directory of them, or - for stdin (repeatable)",
    )
    p.add_argument(
        "-R",
        "--recursive",
        action="store_true",
        help="with -f DIR: also the files in its subdirectories",
    )
    p.add_argument(
        "--dry-run",
        nargs="?",
        const="server",
        default="none",
        choices=("none", "server", "client"),
        help="server: the API server validates and stores nothing; client: validate locally "
        "only; a bare --dry-run means server",
    )
    p.add_argument(
        "--force-conflicts",
        action="store_true",
        help="take over fields another manager owns (server-side apply force)",
    )

    p = _command(
        subs,
        "plan",
        "why a Run waits: phase, reason, forecast, ETA",
        "commands:cmd_plan",
        """
  kubectl runs plan my-run
  kubectl runs plan research/my-run -o yaml
  kubectl runs plan my-run -o jsonpath='{.reservation.earliestStart}'
  kubectl runs plan -f run.yaml      # what-if: would it start now, where, who pays; else ETAs""",
    )
    p.add_argument(
        "run", nargs="?", metavar=completion.RUN_METAVAR, help="Run name or NAMESPACE/NAME"
    )
    p.add_argument(
        "-f",
        "--filename",
        metavar=completion.FILE_METAVAR,
        help="what-if for a Run manifest not yet submitted (read-only: nothing is written)",
    )

    p = _command(
        subs,
        "watch",
        "stream width, funding, countdown and lease events",
        "commands:cmd_watch",
        """
  kubectl runs watch my-run
  kubectl runs watch my-run --timeout 600 || echo "exit $?"   # 3 Failed, 5 timed out

"""
        + EXIT_CODES,
    )
    _run_arg(p)
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds (exit 5)",
    )

    p = _command(
        subs,
        "explain",
        "who pays, where, every lease, lotteries replayed",
        "commands:cmd_explain",
        """
  kubectl runs explain my-run
  kubectl runs explain my-run -o json""",
    )
    _run_arg(p)

    p = _command(
        subs,
        "cancel",
        "delete Runs: their leases close Canceled, their pods go",
        "cancel:cmd_cancel",
        """
  kubectl runs cancel my-run                # asks first on a terminal
  kubectl runs cancel run-a run-b --yes
  kubectl runs cancel -l sweep=lr-2 --yes""",
    )
    p.add_argument(
        "runs", metavar=completion.RUN_METAVAR, nargs="*", help="Run names or NAMESPACE/NAME"
    )
    _selector(p)
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    p = _command(
        subs,
        "logs",
        "a rank's log (its pod's container log)",
        "logs:cmd_logs",
        """
  kubectl runs logs my-run                  # group 0, rank 0
  kubectl runs logs my-run --group 1 --rank 3 -f
  kubectl runs logs my-run --tail 100""",
    )
    _run_arg(p)
    p.add_argument("--group", type=int, default=0, metavar="G", help="group index (default 0)")
    p.add_argument("--rank", type=int, default=0, metavar="R", help="rank in the group (default 0)")
    p.add_argument("-f", "--follow", action="store_true", help="stream the log")
    p.add_argument("-c", "--container", help="container (default: the pod's first)")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    p.add_argument(
        "-p", "--previous", action="store_true", help="the previous (restarted) container's log"
    )

    budgets = _command(subs, "budgets", "budget views", None)
    budget_subs = budgets.add_subparsers(dest="budgets_command", metavar="COMMAND", required=True)
    p = _command(
        budget_subs,
        "usage",
        "headroom per envelope and aggregate cap",
        "commands:cmd_usage",
        """
  kubectl runs budgets usage
  kubectl runs budgets usage --owner org:ai""",
    )
    p.add_argument("--owner", help="owner, with those below it in the budget tree, or a glob")
    p.add_argument(
        "--spare-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="fraction of a spare GPU-hour charged, as the services are configured (default 1)",
    )

    p = _command(
        subs,
        "owners",
        "the owners a namespace may name in its Runs, and where that comes from",
        "owners:cmd_owners",
        """
  kubectl runs owners                       # the current namespace
  kubectl runs owners -n research -o yaml""",
    )

    sponsors = _command(subs, "sponsors", "list or edit spec.funding.sponsors", None)
    sponsor_subs = sponsors.add_subparsers(
        dest="sponsors_command", metavar="COMMAND", required=True
    )
    p = _command(
        sponsor_subs,
        "list",
        "the Run's sponsors and what they pay",
        "commands:cmd_sponsors_list",
        "  kubectl runs sponsors list my-run",
    )
    _run_arg(p)
    for action in ("add", "remove"):
        p = _command(
            sponsor_subs,
            action,
            f"{action} a sponsor owner",
            "commands:cmd_sponsors_edit",
            f"  kubectl runs sponsors {action} my-run org:vision",
        )
        _run_arg(p)
        p.add_argument("owner", metavar="OWNER", help="sponsor owner, e.g. org:vision")

    p = _command(
        subs,
        "shrink",
        "lower a malleable Run's desired width",
        "commands:cmd_shrink",
        """
  kubectl runs shrink my-run --to 96
  kubectl runs shrink my-run --by 32""",
    )
    _run_arg(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--by", type=int, metavar="N", help="shrink by N GPUs")
    how.add_argument("--to", type=int, metavar="N", help="shrink to N GPUs")

    p = _command(
        subs,
        "leases",
        "the Run's leases, open and closed",
        "commands:cmd_leases",
        "  kubectl runs leases my-run\n  kubectl runs leases my-run -o name",
    )
    _run_arg(p)

    p = _command(
        subs,
        "pods",
        "the Run's pods",
        "commands:cmd_pods",
        "  kubectl runs pods my-run -o wide",
    )
    _run_arg(p)

    p = _command(
        subs,
        "version",
        "client version and, when reachable, the API server and Jobtree services",
        "version:cmd_version",
        "  kubectl runs version\n  kubectl runs version --client -o json",
    )
    p.add_argument("--client", action="store_true", help="only the client (no server contact)")

    p = _command(
        subs,
        "completions",
        "print a shell completion script",
        "commands:cmd_completions",
        """
  source <(kubectl-runs completions bash)
  kubectl-runs completions fish | source""",
    )
    p.add_argument("shell", choices=completion.SHELLS, help="shell")
    return parser


# ---------------------------------------------------------------------------- completion


def complete_protocol(
    args: Sequence[str], out: TextIO, environ: Mapping[str, str] | None = None
) -> int:
    """kubectl's plugin completion protocol: candidates, then ``:<directive>``.

    Run names, namespaces and contexts come from the cluster through ``kubectl`` itself (the
    same kubeconfig, context and credentials as the line being completed).
    """
    words = list(args) or [""]
    tree = completion.command_tree(build_parser())
    candidates, directive = completion.complete(tree, words)
    wanted = completion.dynamic(tree, words)
    if wanted is not None:
        from services.kubectl_runs import lookup  # only when the cluster must be asked

        env = os.environ if environ is None else environ
        names = lookup.names(wanted, completion.connection_flags(tree, words[:-1]), env)
        candidates = [n for n in names if n.startswith(words[-1])]
        directive = completion.DIRECTIVE_NO_FILES
    for candidate in candidates:
        print(candidate, file=out)
    print(f":{directive}", file=out)
    return 0


# ---------------------------------------------------------------------------- entry


def handler_of(spec: str) -> Any:
    """The function ``module:function`` names, imported now."""
    module, _, function = spec.partition(":")
    return getattr(import_module(f"{PACKAGE}.{module}"), function)


def run(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """Parse ``argv`` and run the command; the process exit status."""
    if argv and argv[0] == "__complete":
        try:
            return complete_protocol(argv[1:], sys.stdout, environ)
        except BrokenPipeError:  # the shell stopped reading
            return 0
    args = build_parser().parse_args(list(argv))
    from services.kubectl_runs import commands  # the API client, models and views

    return commands.execute(args, os.environ if environ is None else environ)
