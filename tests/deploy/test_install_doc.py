"""docs/install.md, run: every command of its shell blocks is executed as written, with bash, from
a checkout, against a real kube-apiserver (RBAC enforced) with the real kubectl, helm, promtool
and kubectl-runs, in the order of WALKTHROUGH; or it is in NOT_RUN with the reason it cannot run
here. `test_every_documented_command_is_accounted_for` fails when the page gains a command the
walkthrough neither runs nor excuses, or when the walkthrough names one the page no longer has.

The walkthrough gets its own control plane: it labels 32 nodes, installs and uninstalls the
release `jobtree`, applies both Kustomize overlays and labels `team-a` for the walltime policy,
none of which may leak into the session's shared API server (it has no namespace controller, so
namespaces cannot even be deleted there)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.localenv.controlplane import ControlPlane, ensure_binaries
from tests.deploy.conftest import REPO, SERVICES, documents

DOC = REPO / "docs" / "install.md"
SHELL_FENCES = {"bash", "sh", "shell", "console"}
TRACING = "http://jaeger-collector.observability.svc:4318"

# Documented commands that cannot run here, and why. Keep it short and true.
NOT_RUN: dict[str, str] = {
    **{
        command: "needs a container daemon and registry: the test machine has no Docker daemon"
        for command in (
            "docker build -t registry.example/jobtree:$(git rev-parse --short HEAD) .",
            "docker run --rm registry.example/jobtree:$(git rev-parse --short HEAD) binder --help",
            "docker run --rm registry.example/jobtree:$(git rev-parse --short HEAD) "
            "jobtree-packer --help",
            "docker push registry.example/jobtree:$(git rev-parse --short HEAD)",
        )
    },
    **{
        command: "needs a running pod: the test API server has no controller manager or kubelet "
        "for the Jobtree image, so Deployments get no pods (the RandomPreempt line format is "
        "tested with the resolver in tests/unit/engine and tests/service/test_resolver.py)"
        for command in (
            "kubectl logs deploy/jobtree-controller-manager -n jobtree-system | grep RandomPreempt",
            "kubectl logs deploy/jobtree-resolver -n jobtree-system | grep RandomPreempt",
            "kubectl logs deploy/jobtree-controller-manager -n jobtree-system -c forecast",
        )
    },
    "python3 -m pip install .": "would reinstall the package under test into the test's own "
    "interpreter; the walkthrough uses its editable install of the same checkout",
    "kubectl krew install --manifest=plugins/krew/runs.yaml "
    "--archive=dist/krew/kubectl-runs-v0.1.0.tar.gz": "krew is not installed here; "
    "tests/deploy/test_krew.py does what it does with the archive (sha256, files, bin) and runs "
    "the result as `kubectl runs`",
}


# ------------------------------------------------------------------------ the page's commands


@dataclass(frozen=True)
class DocCommand:
    text: str
    """The command with continuation lines joined and whitespace collapsed."""
    section: str
    answer: str | None
    """A trailing `# yes` / `# no` comment: the output the page promises."""


def doc_commands(markdown: str) -> list[DocCommand]:
    """Every command of the page's shell code blocks, in page order."""
    out: list[DocCommand] = []
    section = ""
    lines = iter(markdown.splitlines())
    for line in lines:
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
            continue
        fence = re.fullmatch(r"```(\w*)\s*", line)
        if not fence:
            continue
        body: list[str] = []
        for inner in lines:
            if inner.startswith("```"):
                break
            body.append(inner)
        if fence.group(1) not in SHELL_FENCES:
            continue
        pending = ""
        for raw in body:
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            pending += raw.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            comment = re.search(r"\s+#\s*(.*)$", pending)
            command = pending[: comment.start()] if comment else pending
            answer = comment.group(1).strip() if comment else None
            out.append(
                DocCommand(
                    text=" ".join(command.split()),
                    section=section,
                    answer=answer if answer in ("yes", "no") else None,
                )
            )
            pending = ""
        assert not pending, f"unterminated continuation in {section}: {pending}"
    return out


# --------------------------------------------------------------------------- the walkthrough


@dataclass
class Context:
    kube: ControlPlane
    checkout: Path
    env: dict[str, str]
    answers: dict[str, str | None]

    def kubectl_json(self, *args: str) -> dict[str, Any]:
        data = json.loads(self.kube.kubectl("get", *args, "-o", "json").stdout)
        assert isinstance(data, dict)
        return data


Check = Callable[[Context, subprocess.CompletedProcess[str]], None]


@dataclass(frozen=True)
class Run:
    """Run one documented command (verbatim) and check what it did."""

    command: str
    check: Check | None = None


@dataclass(frozen=True)
class Do:
    """Test-side preparation a real operator would already have (nodes, files)."""

    what: str
    action: Callable[[Context], None]


def has(*texts: str) -> Check:
    def check(_: Context, done: subprocess.CompletedProcess[str]) -> None:
        for text in texts:
            assert text in done.stdout, f"{text!r} not in:\n{done.stdout[-3000:]}"

    return check


def make_nodes(ctx: Context) -> None:
    nodes = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"gpu-{c}-{i:02d}"}}
        for c in "ab"
        for i in range(1, 17)
    ]
    ctx.kube.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes})
    )


def make_team_namespace(ctx: Context) -> None:
    ctx.kube.kubectl("create", "namespace", "team-a")


def make_nats_ca(ctx: Context) -> None:
    """./nats-ca.pem: the CA an external NATS server's certificate is signed by."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (ctx.checkout / "nats-ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def labelled_nodes(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert len(rows) == 32
    for row in rows:
        name, region, cluster, fabric, rack, flavor = row[0], *row[-5:]
        assert (region, cluster, flavor) == ("us-west", name[:5], "H100-80GB"), row
        assert fabric == f"nv-{name[4]}" and rack in ("r01", "r09"), row


def installed(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert "STATUS: deployed" in done.stdout
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    pod = ctx.kubectl_json("deploy/jobtree-controller-manager", "-n", "jobtree-system")
    images = {c["image"] for c in pod["spec"]["template"]["spec"]["containers"]}
    assert images == {f"ghcr.io/davidlangworthy/jobtree:{sha}"}


def rendered_split(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    names = {d["metadata"]["name"] for d in documents(done.stdout) if d["kind"] == "Deployment"}
    assert names == {f"jobtree-{s}" for s in SERVICES}


def rendered_monitoring(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    kinds = {d["kind"] for d in documents(done.stdout)}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds


def manager_env(ctx: Context) -> dict[str, dict[str, Any]]:
    pod = ctx.kubectl_json("deploy/jobtree-controller-manager", "-n", "jobtree-system")
    return {
        c["name"]: {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
        for c in pod["spec"]["template"]["spec"]["containers"]
    }


EXTERNAL_NATS = "tls://nats.messaging.svc:4222"


def authorization_written(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    text = (ctx.checkout / "jobtree-nats-authorization.conf").read_text()
    assert text.startswith("authorization {") and "$JOBTREE_NATS_PASSWORD_BINDER" in text


def external_nats(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert 'Release "jobtree" has been upgraded' in done.stdout
    for name, env in manager_env(ctx).items():
        assert env["JOBTREE_NATS_URL"] == EXTERNAL_NATS
        assert env["JOBTREE_NATS_TLS_CA_FILE"] == "/etc/jobtree/nats-ca/ca.crt"
        assert env["JOBTREE_NATS_USER"] == name
    assert not ctx.kube.kubectl("get", "sts", "-n", "jobtree-system", "-o", "name").stdout


def bcrypt_printed(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert done.stdout.startswith("$2a$"), done.stdout


def nats_secrets_applied(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    for identity in (*SERVICES, "operator"):
        assert f"secret/jobtree-nats-{identity} created" in done.stdout, done.stdout
    assert "secret/jobtree-nats-tls created" in done.stdout
    assert "configmap/jobtree-nats-ca created" in done.stdout


def tracing_on(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    for env in manager_env(ctx).values():
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == TRACING
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
        # the earlier --set values were kept (--reuse-values)
        assert env["JOBTREE_NATS_URL"] == EXTERNAL_NATS
    assert f"exports its spans over OTLP/HTTP to {TRACING}" in done.stdout  # NOTES


def tracing_listed(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert done.stdout.splitlines() == [f"{s} {TRACING}" for s in SERVICES]


def webhooks_ignore(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    hook = ctx.kubectl_json("validatingwebhookconfiguration/jobtree-validating")
    assert {w["failurePolicy"] for w in hook["webhooks"]} == {"Ignore"}


def shared_token(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    pod = ctx.kubectl_json("deploy/jobtree-controller-manager", "-n", "jobtree-system")
    assert pod["spec"]["template"]["spec"].get("automountServiceAccountToken") is not False
    binding = ctx.kubectl_json("clusterrolebinding/jobtree-binder")
    assert {s["name"] for s in binding["subjects"]} >= {"jobtree-controller-manager"}


def crds_applied(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    for crd in ("budgets", "runs", "reservations", "leases"):
        assert f"{crd}.rq.davidlangworthy.io serverside-applied" in done.stdout


def split_mode(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    names = ctx.kube.kubectl("get", "deploy", "-n", "jobtree-system", "-o", "name").stdout.split()
    assert sorted(names) == sorted(f"deployment.apps/jobtree-{s}" for s in SERVICES)
    # the tracing values of section 7.1 survived two more --reuse-values upgrades
    binder = ctx.kubectl_json("deploy/jobtree-binder", "-n", "jobtree-system")
    (container,) = binder["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == TRACING


def uninstalled(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert 'release "jobtree" uninstalled' in done.stdout
    gone = ctx.kube.kubectl("get", "clusterrole/jobtree-binder", check=False)
    assert gone.returncode != 0
    ctx.kube.kubectl("get", "crd/leases.rq.davidlangworthy.io")  # the ledger stays


def dev_applied(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    binder = ctx.kubectl_json("deploy/jobtree-binder", "-n", "jobtree-system")
    assert binder["spec"]["replicas"] == 1
    (container,) = binder["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/davidlangworthy/jobtree:dev"
    names = [source["configMapRef"]["name"] for source in container["envFrom"]]
    (name,) = [n for n in names if n.startswith("jobtree-tracing-")]
    data = ctx.kubectl_json(f"configmap/{name}", "-n", "jobtree-system")["data"]
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == TRACING


def prod_applied(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert "validatingadmissionpolicy.admissionregistration.k8s.io/jobtree-require-walltime" in (
        done.stdout
    )
    admission = ctx.kubectl_json("deploy/jobtree-admission", "-n", "jobtree-system")
    assert admission["spec"]["replicas"] == 3


def budgets_listed(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    names = [line.split()[0] for line in done.stdout.splitlines()[1:]]
    assert names, done.stdout
    for manifest in ("budget-west-h100.yaml", "budget-vision-lending.yaml"):
        text = (REPO / "config" / "samples" / "budgets" / manifest).read_text()
        name = re.search(r"^  name: (\S+)$", text, re.MULTILINE)
        assert name is not None and name.group(1) in names, (manifest, names)


def usage_shown(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    # the owner's envelopes in the seeded Budget, with their full headroom (nothing runs yet)
    assert "org:ai:rai:sys (Budget west-h100, H100-80GB)" in done.stdout, done.stdout
    assert re.search(r"^west-h100-nv-a\s+open\s+0/96\s+96\b", done.stdout, re.MULTILINE)


def plugin_listed(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert str(Path(sys.executable).parent / "kubectl-runs") in done.stdout


def every_kind_listed(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    for kind in ("budget", "run", "reservation"):
        assert f"{kind}.rq.davidlangworthy.io/" in done.stdout, done.stdout


def planned(ctx: Context, done: subprocess.CompletedProcess[str]) -> None:
    assert "run-128-groups" in done.stdout, done.stdout


WALKTHROUGH: list[Run | Do] = [
    Do("GPU nodes named as in the administrator guide", make_nodes),
    Do("a team namespace", make_team_namespace),
    Do("the external NATS server's CA, ./nats-ca.pem", make_nats_ca),
    # 2. Label the topology
    Run("kubectl label nodes gpu-a-{01..16} region=us-west cluster=gpu-a fabric.domain=nv-a "
        "rack=r01 gpu.flavor=H100-80GB", has("node/gpu-a-01 labeled", "node/gpu-a-16 labeled")),
    Run("kubectl label nodes gpu-b-{01..16} region=us-west cluster=gpu-b fabric.domain=nv-b "
        "rack=r09 gpu.flavor=H100-80GB", has("node/gpu-b-16 labeled")),
    Run("kubectl get nodes -L region,cluster,fabric.domain,rack,gpu.flavor", labelled_nodes),
    # 3. Install with Helm
    Run("helm install jobtree deploy/helm/gpu-fleet --namespace jobtree-system --create-namespace "
        "--set image.tag=$(git rev-parse --short HEAD)", installed),
    Run("helm template jobtree deploy/helm/gpu-fleet -n jobtree-system --set mode=split",
        rendered_split),
    Run("helm template jobtree deploy/helm/gpu-fleet -n jobtree-system --api-versions "
        "monitoring.coreos.com/v1", rendered_monitoring),
    Run("helm lint --strict deploy/helm/gpu-fleet", has("1 chart(s) linted, 0 chart(s) failed")),
    # 3.1 external NATS
    Run("python3 -m shared.bus.auth > jobtree-nats-authorization.conf", authorization_written),
    Run("kubectl -n jobtree-system create secret generic nats-ca --from-file=ca.crt=./nats-ca.pem",
        has("secret/nats-ca created")),
    Run("helm upgrade --install jobtree deploy/helm/gpu-fleet -n jobtree-system "
        f"--set nats.bundled=false --set nats.url={EXTERNAL_NATS} "
        "--set nats.tls.caSecret=nats-ca --set image.tag=$(git rev-parse --short HEAD)",
        external_nats),
    Run("kubectl -n jobtree-system get secret jobtree-nats-binder -o jsonpath='{.data.bcrypt}' "
        "| base64 -d", bcrypt_printed),
    # 3.2 RBAC (the answers are the page's `# yes` / `# no`)
    Run("kubectl auth can-i create pods "
        "--as=system:serviceaccount:jobtree-system:jobtree-binder -n team-a"),
    Run("kubectl auth can-i create pods "
        "--as=system:serviceaccount:jobtree-system:jobtree-admission -n team-a"),
    Run("kubectl auth can-i create leases.rq.davidlangworthy.io "
        "--as=system:serviceaccount:jobtree-system:jobtree-resolver"),
    Run("kubectl auth can-i patch leases.rq.davidlangworthy.io --subresource=status "
        "--as=system:serviceaccount:jobtree-system:jobtree-binder"),
    # 3.3 Roles for people
    Run("kubectl create rolebinding alice-runs -n team-a --clusterrole=jobtree-researcher "
        "--user=alice", has("rolebinding.rbac.authorization.k8s.io/alice-runs created")),
    Run("kubectl create clusterrolebinding researchers-ledger "
        "--clusterrole=jobtree-ledger-reader --group=researchers",
        has("clusterrolebinding.rbac.authorization.k8s.io/researchers-ledger created")),
    Run("kubectl create clusterrolebinding platform-admins --clusterrole=jobtree-admin "
        "--group=platform-team",
        has("clusterrolebinding.rbac.authorization.k8s.io/platform-admins created")),
    Run("kubectl auth can-i create runs.rq.davidlangworthy.io -n team-a --as=alice"),
    Run("kubectl auth can-i create reservations.rq.davidlangworthy.io -n team-a --as=alice"),
    Run("kubectl auth can-i list leases.rq.davidlangworthy.io --as=alice --as-group=researchers"),
    Run("kubectl auth can-i create budgets.rq.davidlangworthy.io --as=carol "
        "--as-group=platform-team"),
    # 7.1 Tracing
    Run("helm upgrade jobtree deploy/helm/gpu-fleet -n jobtree-system --reuse-values "
        f"--set tracing.otlpEndpoint={TRACING} "
        "--set tracing.sampler=parentbased_traceidratio --set tracing.samplerArg=0.1",
        tracing_on),
    Run("kubectl get deploy/jobtree-controller-manager -n jobtree-system -o "
        "jsonpath='{range .spec.template.spec.containers[*]}{.name}{\" \"}"
        "{.env[?(@.name==\"OTEL_EXPORTER_OTLP_ENDPOINT\")].value}{\"\\n\"}{end}'",
        tracing_listed),
    # 9. Troubleshooting: the two stopgap upgrades
    Run("helm upgrade jobtree deploy/helm/gpu-fleet -n jobtree-system --reuse-values "
        "--set webhooks.failurePolicy=Ignore", webhooks_ignore),
    Run("helm upgrade jobtree deploy/helm/gpu-fleet -n jobtree-system --reuse-values "
        "--set controllerManager.tokenPerService=false", shared_token),
    # 8. Day-two operations
    Run("kubectl apply --server-side --force-conflicts -f crds/", crds_applied),
    Run("helm upgrade jobtree deploy/helm/gpu-fleet -n jobtree-system --reuse-values "
        "--set image.tag=$(git rev-parse --short HEAD)", has("has been upgraded")),
    Run("helm upgrade jobtree deploy/helm/gpu-fleet -n jobtree-system --reuse-values "
        "--set mode=split", split_mode),
    Run("helm uninstall jobtree -n jobtree-system", uninstalled),
    # 4. Install with Kustomize (after the Helm release is gone: they are alternatives; prod
    # first, as server-side apply would conflict with the fields dev's client-side apply set)
    Run("kubectl apply -f deploy/kustomize/base/namespace.yaml"),
    Run("python3 -m shared.bus.auth secrets --tls --namespace jobtree-system | kubectl apply -f -",
        nats_secrets_applied),
    Run("kubectl kustomize deploy/kustomize/dev", has("kind: Deployment", "jobtree-tracing-")),
    Run("kubectl apply --dry-run=server -k deploy/kustomize/dev",
        has("deployment.apps/jobtree-binder created (server dry run)")),
    Run("kubectl apply --server-side -k deploy/kustomize/prod", prod_applied),
    Run("kubectl label namespace team-a jobtree.io/enforce-walltime=true",
        has("namespace/team-a labeled")),
    Run("kubectl apply -k deploy/kustomize/dev", dev_applied),
    # 5. Seed budgets and families
    Run("kubectl apply -f config/samples/budgets/budget-west-h100.yaml"),
    Run("kubectl apply -f config/samples/budgets/budget-vision-lending.yaml"),
    Run("kubectl get budgets.rq.davidlangworthy.io", budgets_listed),
    Run("kubectl runs budgets usage --owner org:ai:rai:sys", usage_shown),
    Run("kubectl annotate namespace team-a rq.davidlangworthy.io/owners='org:ai:*' --overwrite",
        has("namespace/team-a annotated")),
    Run("kubectl label namespace team-a pod-security.kubernetes.io/enforce=baseline "
        "pod-security.kubernetes.io/warn=restricted --overwrite",
        has("namespace/team-a labeled")),
    # 5.1 the plugin
    Run("kubectl plugin list", plugin_listed),
    Run("kubectl runs --help", has("usage: kubectl runs")),
    Run("python3 hack/krew_archive.py --check", has("plugins/krew/runs.yaml is up to date")),
    # 6. Validate the workflow end to end (no services run here: the objects are accepted)
    Run("kubectl apply -f config/samples/runs/run-128-groups.yaml",
        has("run.rq.davidlangworthy.io/run-128-groups created")),
    Run("kubectl get leases.rq.davidlangworthy.io"),
    Run("kubectl apply -f config/samples/runs/run-cofunded-128.yaml",
        has("run.rq.davidlangworthy.io/run-cofunded-128 created")),
    Run("kubectl apply -f config/samples/reservations/reservation-example.yaml",
        has("reservation.rq.davidlangworthy.io/reservation-example created")),
    Run("kubectl get jobtree -A", every_kind_listed),
    # 9. Troubleshooting: first look
    Run("kubectl get pods -n jobtree-system"),
    Run("kubectl runs plan run-128-groups", planned),
    # 7. Observability
    Run("promtool check rules deploy/prometheus/rules.yaml", has("SUCCESS")),
]  # fmt: skip


# ------------------------------------------------------------------------------------- tests


def test_every_documented_command_is_accounted_for() -> None:
    documented = [c.text for c in doc_commands(DOC.read_text())]  # a repeat is run once
    walked = [step.command for step in WALKTHROUGH if isinstance(step, Run)]
    assert len(walked) == len(set(walked))
    assert not set(walked) & set(NOT_RUN), "run and excused at once"
    missing = [c for c in documented if c not in walked and c not in NOT_RUN]
    assert not missing, "documented but neither run nor excused:\n" + "\n".join(missing)
    stale = [c for c in [*walked, *NOT_RUN] if c not in documented]
    assert not stale, "run or excused but not on the page (any more):\n" + "\n".join(stale)


def test_command_extraction() -> None:
    page = (
        "## A\n```bash\nfoo a \\\n  b   # yes\n# note\n\nbar 'x  y' # comment\n```\n"
        "```yaml\nkey: value\n```\n## B\n```sh\nbaz\n```\n"
    )
    assert doc_commands(page) == [
        DocCommand("foo a b", "A", "yes"),
        DocCommand("bar 'x y'", "A", None),
        DocCommand("baz", "B", None),
    ]


@pytest.fixture(scope="module")
def walkthrough_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(workdir=tmp_path_factory.mktemp("install-doc"), bin_dir=ensure_binaries())
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()


def checkout(root: Path) -> Path:
    """A directory that looks like a checkout (the page's relative paths, git) without letting
    the commands write into the real one."""
    root.mkdir()
    for name in ("config", "crds", "deploy", "hack", "plugins", "pyproject.toml", "Dockerfile"):
        (root / name).symlink_to(REPO / name)
    return root


@pytest.mark.kube
def test_install_doc_walkthrough(
    walkthrough_cluster: ControlPlane, deploy_bin: Path, tmp_path: Path
) -> None:
    kube = walkthrough_cluster
    answers = {c.text: c.answer for c in doc_commands(DOC.read_text())}
    env = kube.env()
    home = tmp_path / "home"
    home.mkdir()
    path = [str(deploy_bin), str(kube.bin_dir), str(Path(sys.executable).parent), env["PATH"]]
    env.update(
        PATH=os.pathsep.join(path),
        HOME=str(home),  # helm's config and cache
        GIT_DIR=str(REPO / ".git"),  # `git rev-parse --short HEAD` of the real checkout
    )
    ctx = Context(kube=kube, checkout=checkout(tmp_path / "jobtree"), env=env, answers=answers)
    for step in WALKTHROUGH:
        if isinstance(step, Do):
            step.action(ctx)
            continue
        assert step.command in answers, f"not on the page: {step.command}"
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", step.command],
            cwd=ctx.checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        answer = answers[step.command]
        expected_rc = 1 if answer == "no" else 0  # `kubectl auth can-i` exits 1 on "no"
        assert done.returncode == expected_rc, (
            f"$ {step.command}\nexit {done.returncode}\n"
            f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
        if answer is not None:
            assert done.stdout.strip() == answer, f"$ {step.command}\n{done.stdout}"
        if step.check is not None:
            step.check(ctx, done)
