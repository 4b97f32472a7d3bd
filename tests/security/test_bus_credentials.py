"""The other ways a service proves who it is, against a real nats-server: an nkey seed file, TLS
with the server checked against a CA and the client's own certificate (mutual TLS), and a
``.creds`` file on a server in operator (JWT) mode whose user JWTs carry the generated
permissions.

A runtime with the right credential starts and serves; one without is refused at connect.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.bus import ACTIVATE, ActivateReply, ActivateRequest, ServiceRuntime
from shared.bus.auth import User, hash_password, permissions, render_authorization
from shared.bus.config import BusCredentials
from shared.localenv.natsserver import nats_server_binary, server_config
from shared.localenv.processes import free_port, spawn, stop, wait_until

pytestmark = [pytest.mark.nats, pytest.mark.asyncio(loop_scope="session")]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class Server:
    """A nats-server started from a given config text (ports chosen here)."""

    def __init__(self, workdir: Path, authorization: str, extra: str = "") -> None:
        self.workdir = workdir
        self.port = free_port()
        conf = workdir / "nats.conf"
        conf.write_text(
            server_config(
                port=self.port,
                monitor_port=free_port(),
                store_dir=workdir / "js",
                authorization=authorization,
            )
            + extra
        )
        log = workdir / "nats.log"
        self.proc = spawn([nats_server_binary(), "-c", str(conf)], log)
        wait_until(self._accepting, timeout=30, what="nats-server", proc=self.proc, log=log)

    def _accepting(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


FORECAST_PASSWORD = "forecast-secret"


def _forecast_user() -> User:
    return User("forecast", password=hash_password(FORECAST_PASSWORD, rounds=10))


async def _serves(resolver: ServiceRuntime, forecast_creds: BusCredentials, url: str) -> None:
    """The resolver connects under its identity, registers (streams, endpoint, ``$SRV``) and
    answers the forecaster's ACTIVATE."""

    async def activate(req: ActivateRequest) -> ActivateReply:
        return ActivateReply(released=False, seed=None, message=f"seen {req.name}")

    resolver.endpoint(ACTIVATE, activate)
    forecast = ServiceRuntime("forecast", nats_url=url, credentials=forecast_creds)
    await asyncio.wait_for(resolver.start(), 30)
    try:
        await asyncio.wait_for(forecast.start(), 30)
        request = ActivateRequest(namespace="ns", name="r", uid="u")
        reply = await forecast.request(ACTIVATE, request, timeout=10)
        assert reply.message == "seen r"
    finally:
        await forecast.stop()
        await resolver.stop()


async def test_an_nkey_seed_file_is_an_identity(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "resolver.nk"
    seed_file.write_bytes(seed)
    seed_file.chmod(0o600)
    users = [User("resolver", nkey=public), _forecast_user()]
    server = Server(tmp_path, render_authorization(users))
    try:
        creds = BusCredentials(nkey_seed_file=str(seed_file))
        forecast = BusCredentials(user="forecast", password=FORECAST_PASSWORD)
        await _serves(
            ServiceRuntime("resolver", nats_url=server.url, credentials=creds), forecast, server.url
        )
        other = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        (tmp_path / "other.nk").write_bytes(other)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(
                server.url, nkeys_seed=str(tmp_path / "other.nk"), allow_reconnect=False
            )
    finally:
        stop(server.proc)


async def test_mutual_tls_with_a_password(tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("jobtree test CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "ca": _write_cert(tmp_path / "ca.crt", ca),
        "server": _write_cert(
            tmp_path / "server.crt", _cert("nats", server_key, (ca, ca_key), server=True)
        ),
        "server_key": _write_key(tmp_path / "server.key", server_key),
        "client": _write_cert(tmp_path / "client.crt", _cert("resolver", client_key, (ca, ca_key))),
        "client_key": _write_key(tmp_path / "client.key", client_key),
    }
    (tmp_path / "password").write_text("resolver-secret")
    tls = (
        "tls {\n"
        f"  cert_file: {json.dumps(str(files['server']))}\n"
        f"  key_file: {json.dumps(str(files['server_key']))}\n"
        f"  ca_file: {json.dumps(str(files['ca']))}\n"
        "  verify: true\n"
        "}\n"
    )
    users = [
        User("resolver", password=hash_password("resolver-secret", rounds=10)),
        _forecast_user(),
    ]
    server = Server(tmp_path, render_authorization(users), tls)
    try:
        creds = BusCredentials(
            user="resolver",
            password_file=str(tmp_path / "password"),
            tls_ca_file=str(files["ca"]),
            tls_cert_file=str(files["client"]),
            tls_key_file=str(files["client_key"]),
        )
        forecast = BusCredentials(
            user="forecast",
            password=FORECAST_PASSWORD,
            tls_ca_file=str(files["ca"]),
            tls_cert_file=str(files["client"]),
            tls_key_file=str(files["client_key"]),
        )
        await _serves(
            ServiceRuntime("resolver", nats_url=server.url, credentials=creds), forecast, server.url
        )
        # the right password without a client certificate: the TLS handshake fails
        no_cert = BusCredentials(
            user="resolver", password_file=str(tmp_path / "password"), tls_ca_file=str(files["ca"])
        )
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError, TimeoutError)):
            await nats.connect(
                server.url, allow_reconnect=False, connect_timeout=5, **no_cert.connect_options()
            )
        # no TLS at all: refused
        with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
            await nats.connect(
                server.url, user="resolver", password="resolver-secret", allow_reconnect=False
            )
    finally:
        stop(server.proc)


# --------------------------------------------------------------------------- .creds (JWT)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _keypair(prefix: int) -> tuple[bytes, Any]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _jwt(signer: Any, subject: str, name: str, claims: dict[str, Any]) -> str:
    """A NATS JWT (v2): ``header.claims`` signed with the issuer's nkey."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = {
        "jti": base64.b32encode(os.urandom(32)).decode().rstrip("="),
        "iat": int(datetime.now(UTC).timestamp()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": claims,
    }
    payload = _b64(json.dumps(body).encode())
    signature = signer.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
UNLIMITED |= {"wildcards": True, "conn": -1, "leaf": -1}


def _user_creds(account: Any, identity: str, path: Path) -> Path:
    """A ``.creds`` file whose user JWT carries ``permissions(identity)`` (the documented way to
    run Jobtree on JWT accounts: the permissions of ``jobtree-nats-auth json``)."""
    seed, user = _keypair(nkeys.PREFIX_BYTE_USER)
    grants = permissions(identity)
    claims: dict[str, Any] = {
        "pub": {"allow": list(grants.publish)},
        "sub": {"allow": list(grants.subscribe)},
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": 2,
    }
    if grants.allow_responses:
        claims["resp"] = {"max": 1, "ttl": 0}
    token = _jwt(account, user.public_key.decode(), identity, claims)
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


async def test_a_creds_file_carrying_the_generated_permissions(tmp_path: Path) -> None:
    _, operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, stranger = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # an account the server does not trust
    op_pub = operator.public_key.decode()
    acc_pub, sys_pub = account.public_key.decode(), system.public_key.decode()
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    acc_jwt = _jwt(
        operator,
        acc_pub,
        "jobtree",
        {"limits": UNLIMITED | jetstream, "type": "account", "version": 2},
    )
    sys_jwt = _jwt(operator, sys_pub, "SYS", {"limits": UNLIMITED, "type": "account", "version": 2})
    op_jwt = _jwt(operator, op_pub, "jobtree-test", {"type": "operator", "version": 2})
    trust = (
        f"operator: {op_jwt}\nsystem_account: {sys_pub}\nresolver: MEMORY\n"
        f"resolver_preload: {{ {acc_pub}: {acc_jwt}, {sys_pub}: {sys_jwt} }}\n"
    )
    server = Server(tmp_path, "", trust)
    try:
        resolver_creds = _user_creds(account, "resolver", tmp_path / "resolver.creds")
        forecast_creds = _user_creds(account, "forecast", tmp_path / "forecast.creds")
        await _serves(
            ServiceRuntime(
                "resolver",
                nats_url=server.url,
                credentials=BusCredentials(creds_file=str(resolver_creds)),
            ),
            BusCredentials(creds_file=str(forecast_creds)),
            server.url,
        )
        forged = _user_creds(stranger, "binder", tmp_path / "forged.creds")
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(server.url, user_credentials=str(forged), allow_reconnect=False)
    finally:
        stop(server.proc)
