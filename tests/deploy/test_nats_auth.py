"""The bundled NATS of the Helm chart and of the Kustomize base, run for real: the nats.conf they
render (authorization from ``shared.bus.auth``, TLS) is started with a real nats-server, with the
passwords and certificates the chart generates (Helm) or ``python3 -m shared.bus.auth secrets
--tls`` prints (Kustomize), and every service connects exactly as its container would: its own
user and password file, the CA, ``tls://``. Anonymous and plaintext clients are refused.

Only the paths and ports a pod has and this machine has not are rewritten (/data, /etc/nats/tls,
port 4222, the pid file).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from shared.bus import PLAN, PlanReply, PlanRequest, ServiceRuntime
from shared.bus.auth import env_users, password_env, render_authorization
from shared.bus.config import BusCredentials
from shared.bus.subjects import IDENTITIES, SERVICES
from shared.localenv.controlplane import ControlPlane
from shared.localenv.natsserver import nats_server_binary
from shared.localenv.processes import free_port, stop, wait_until
from tests.deploy.conftest import CHART, KUSTOMIZE, REPO, documents, find, one, run

NAMESPACE = "jobtree-system"
HELM_AUTH = CHART / "files" / "nats-authorization.conf"
KUSTOMIZE_AUTH = KUSTOMIZE / "base" / "nats-authorization.conf"
REGENERATE = "python3 -m shared.bus.auth > {path}"


def test_the_shipped_authorization_is_the_generated_one() -> None:
    expected = render_authorization(env_users())
    for path in (HELM_AUTH, KUSTOMIZE_AUTH):
        assert path.read_text() == expected, (
            f"{path.relative_to(REPO)} is stale: {REGENERATE.format(path=path.relative_to(REPO))}"
        )


def test_the_chart_knows_every_identity() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    match = re.search(r'define "gpu-fleet.natsIdentities" -}}\n(.*)\n', helpers)
    assert match is not None
    assert tuple(match.group(1).split()) == IDENTITIES


def helm(deploy_bin: Path, *args: str) -> list[dict[str, Any]]:
    done = run([deploy_bin / "helm", "template", "jobtree", CHART, "-n", NAMESPACE, *args])
    return documents(done.stdout)


def _data(secret: dict[str, Any]) -> dict[str, str]:
    if "stringData" in secret:
        return dict(secret["stringData"])
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


class Bundled:
    """One rendered bundled NATS, started from its own nats.conf on this machine."""

    def __init__(
        self,
        workdir: Path,
        conf: str,
        files: dict[str, str],
        secrets: dict[str, dict[str, str]],
        tls: dict[str, str],
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        etc = workdir / "etc"
        (etc / "tls").mkdir(parents=True)
        for name, text in files.items():
            (etc / name).write_text(text)
        (etc / "tls" / "tls.crt").write_text(tls["tls.crt"])
        (etc / "tls" / "tls.key").write_text(tls["tls.key"])
        conf = (
            conf.replace("port: 4222", f"port: {self.port}")
            .replace("http: 127.0.0.1:8222", f"http: 127.0.0.1:{free_port()}")
            .replace("/data/jetstream", str(workdir / "jetstream"))
            .replace("/etc/nats/tls/", f"{etc}/tls/")
            .replace("/tmp/nats-server.pid", str(workdir / "nats.pid"))
        )
        (etc / "nats.conf").write_text(conf)
        env = dict(os.environ, POD_NAME="jobtree-nats-0")
        for identity in IDENTITIES:
            env[password_env(identity)] = secrets[identity]["bcrypt"]
        self.passwords = {i: secrets[i]["password"] for i in IDENTITIES}
        (workdir / "ca.crt").write_text(tls["ca.crt"])
        log = workdir / "nats.log"
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(etc / "nats.conf")],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

        def accepting() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(accepting, timeout=30, what="nats-server", proc=self.proc, log=log)

    def credentials(self, identity: str, server_name: str) -> BusCredentials:
        """What the identity's container mounts: its password file and the CA."""
        secret = self.workdir / f"{identity}.password"
        secret.write_text(self.passwords[identity])
        return BusCredentials(
            user=identity,
            password_file=str(secret),
            tls_ca_file=str(self.workdir / "ca.crt"),
            tls_server_name=server_name,
        )

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"


async def _every_service_connects(bundled: Bundled, server_name: str) -> None:
    runtimes = [
        ServiceRuntime(n, nats_url=bundled.url, credentials=bundled.credentials(n, server_name))
        for n in SERVICES
    ]

    async def plan(req: PlanRequest) -> PlanReply:
        raise AssertionError("not reached: the request does not decode")

    runtimes[SERVICES.index("packer")].endpoint(PLAN, plan)
    try:
        for rt in runtimes:
            await asyncio.wait_for(rt.start(), 30)  # streams, consumers, $SRV: its permissions
        reply = await runtimes[0].nc.request(PLAN.name, b"{}", timeout=10)
        assert reply.headers["Nats-Service-Error-Code"] == "400"  # the packer answered
    finally:
        for rt in runtimes:
            await rt.stop()
    anonymous = BusCredentials(
        tls_ca_file=str(bundled.workdir / "ca.crt"), tls_server_name=server_name
    )
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(bundled.url, allow_reconnect=False, **anonymous.connect_options())
    plain = f"nats://127.0.0.1:{bundled.port}"
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        creds = bundled.credentials("binder", server_name).connect_options()
        await nats.connect(plain, user="binder", password=creds["password"], allow_reconnect=False)


@pytest.mark.nats
@pytest.mark.asyncio(loop_scope="session")
async def test_the_helm_bundled_nats_runs_with_the_rendered_config(
    deploy_bin: Path, tmp_path: Path
) -> None:
    docs = helm(deploy_bin)
    conf = one(docs, "ConfigMap", "jobtree-nats")["data"]["nats.conf"]
    assert "include" not in conf and "authorization {" in conf
    secrets = {i: _data(one(docs, "Secret", f"jobtree-nats-{i}")) for i in IDENTITIES}
    assert all(s["bcrypt"].startswith("$2a$") for s in secrets.values())
    tls = _data(one(docs, "Secret", "jobtree-nats-tls"))
    assert (
        one(docs, "ConfigMap", "jobtree-nats-ca")["data"]["ca.crt"].strip() == tls["ca.crt"].strip()
    )
    bundled = Bundled(tmp_path, conf, {}, secrets, tls)
    try:
        await _every_service_connects(bundled, f"jobtree-nats.{NAMESPACE}.svc")
    finally:
        stop(bundled.proc)


@pytest.mark.nats
@pytest.mark.asyncio(loop_scope="session")
async def test_the_kustomize_bundled_nats_runs_with_the_documented_secrets(
    kube: ControlPlane, tmp_path: Path
) -> None:
    docs = documents(kube.kubectl("kustomize", str(KUSTOMIZE / "base")).stdout)
    (config,) = [
        d
        for d in find(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("jobtree-nats-") and "nats.conf" in d["data"]
    ]
    printed = run([sys.executable, "-m", "shared.bus.auth", "secrets", "--tls"]).stdout
    made = documents(printed)
    secrets = {i: _data(one(made, "Secret", f"jobtree-nats-{i}")) for i in IDENTITIES}
    tls = _data(one(made, "Secret", "jobtree-nats-tls"))
    assert one(made, "ConfigMap", "jobtree-nats-ca")["data"]["ca.crt"] == tls["ca.crt"]
    files = {"authorization.conf": config["data"]["authorization.conf"]}
    bundled = Bundled(tmp_path, config["data"]["nats.conf"], files, secrets, tls)
    try:
        # the services' URL is tls://jobtree-nats:4222: the certificate must carry that name
        await _every_service_connects(bundled, "jobtree-nats")
    finally:
        stop(bundled.proc)


def _pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d["spec"]["template"]["spec"]
        for d in docs
        if d.get("kind") in ("Deployment", "StatefulSet")
    ]


def _assert_closed(docs: list[dict[str, Any]], prefix: str) -> None:
    """NetworkPolicy on the client port; no monitoring port outside the NATS pod."""
    policy = one(docs, "NetworkPolicy", "jobtree-nats")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 4222, "protocol": "TCP"}]
    assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/part-of"] == "jobtree"
    for service in find(docs, "Service"):
        if service["metadata"]["name"].startswith("jobtree-nats"):
            assert [p["port"] for p in service["spec"]["ports"]] == [4222]
    nats_pod = one(docs, "StatefulSet", "jobtree-nats")["spec"]["template"]["spec"]
    (container,) = nats_pod["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [4222]
    for spec in _pod_specs(docs):
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if c["name"] in SERVICES:
                assert env["JOBTREE_NATS_USER"] == c["name"]
                assert env["JOBTREE_NATS_PASSWORD_FILE"] == "/etc/jobtree/nats-auth/password"
                assert env["JOBTREE_NATS_URL"].startswith("tls://")
                assert env["JOBTREE_NATS_TLS_CA_FILE"] == "/etc/jobtree/nats-ca/ca.crt"
        secret_names = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        names = {c["name"] for c in spec["containers"]}
        for service in names & set(SERVICES):
            assert f"{prefix}-nats-{service}" in secret_names
        # no container mounts another identity's Secret
        others = {f"{prefix}-nats-{i}" for i in IDENTITIES if i not in names}
        assert not secret_names & others


def test_helm_install_is_closed_by_default(deploy_bin: Path) -> None:
    for mode in ("combined", "split"):
        _assert_closed(helm(deploy_bin, "--set", f"mode={mode}"), "jobtree")


def test_kustomize_base_is_closed(kube: ControlPlane) -> None:
    docs = documents(kube.kubectl("kustomize", str(KUSTOMIZE / "base")).stdout)
    _assert_closed(docs, "jobtree")
    # the base ships no secret: the operator creates them (docs/install.md)
    assert not find(docs, "Secret")


def test_helm_refuses_a_bundled_nats_without_auth(deploy_bin: Path) -> None:
    failed = run(
        [deploy_bin / "helm", "template", "jobtree", CHART, "--set", "nats.auth.enabled=false"],
        check=False,
    )
    assert failed.returncode != 0 and "nats.auth.enabled" in failed.stderr
    external = helm(
        deploy_bin,
        "--set",
        "nats.bundled=false",
        "--set",
        "nats.url=tls://nats.example:4222",
        "--set",
        "nats.auth.createSecrets=false",
    )
    assert not find(external, "Secret", "jobtree-nats-binder")
    assert not find(external, "NetworkPolicy")
    manager = one(external, "Deployment", "jobtree-controller-manager")
    for c in manager["spec"]["template"]["spec"]["containers"]:
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["JOBTREE_NATS_USER"] == c["name"]
