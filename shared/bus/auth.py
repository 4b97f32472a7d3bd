"""Bus identities and their least-privilege NATS permissions, derived from the subject catalog.

Every service connects as its own NATS user (``admission``, ``packer``, ``forecast``,
``resolver``, ``binder``), and a read-only ``operator`` user serves the ``nats`` CLI. What each
may publish and subscribe is computed here from ``shared.bus.subjects`` and nowhere else:

- requests it sends (a producer of a request subject) and endpoints it serves (its consumer, in
  the ``nats.micro`` queue group); replies go back through ``allow_responses``, never through a
  publish grant on inboxes;
- events it produces, core events it consumes, and for each durable event it consumes exactly
  the JetStream API of its own durable consumer (info, create, fetch, ack);
- the dead-letter subjects of what it consumes (it dead-letters nothing else);
- ``$SRV`` discovery of its own ``nats.micro`` service;
- its own reply inbox (``_INBOX.<identity>.>``) and nobody else's;
- for each stream it uses, ``STREAM.CREATE`` (a create never changes an existing stream); only
  the stream's owner may ``STREAM.UPDATE``; nobody may ``STREAM.DELETE`` or purge the event and
  dead-letter streams; only the binder may touch its commit journal.

:func:`render_authorization` turns identities and credentials into the nats-server
``authorization`` block; the same text is what ``jobtree-local``, the tests, the Helm chart and the
Kustomize base run with, and ``jobtree-nats-auth`` prints it for an operator's own NATS (and
``jobtree-nats-auth secrets`` the Kubernetes Secrets holding fresh passwords).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import bcrypt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.bus.subjects import (
    CATALOG,
    DEADLETTER,
    DEADLETTER_STREAM,
    EVENTS_STREAM,
    IDENTITIES,
    JOURNAL_STREAM,
    OPERATOR,
    SERVICES,
    STREAMS,
    StreamSpec,
    Subject,
    consumer_name,
    deadletter_subject,
    inbox_prefix,
    stream_of,
)

JS_API = "$JS.API"
SRV_VERBS = ("PING", "INFO", "STATS")


@dataclass(frozen=True)
class Permissions:
    """What one identity may publish and subscribe (allow lists: everything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool
    """May answer a request it received (one reply per request, to its reply subject only)."""


def _service_name(identity: str) -> str:
    return f"jobtree-{identity}"


def _stream_grants(identity: str, stream: StreamSpec) -> list[str]:
    grants = [f"{JS_API}.STREAM.CREATE.{stream.name}"]
    if identity == stream.owner:
        grants.append(f"{JS_API}.STREAM.UPDATE.{stream.name}")
    return grants


def _durable_grants(identity: str, subject: Subject[Any, Any]) -> list[str]:
    """The JetStream API of the durable consumer ``identity`` keeps on ``subject``."""
    stream = stream_of(subject).name
    name = consumer_name(identity, subject)
    return [
        f"{JS_API}.CONSUMER.INFO.{stream}.{name}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.{name}.{subject.name}",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


def _service_permissions(identity: str) -> Permissions:
    publish: list[str] = []
    subscribe: list[str] = [f"{inbox_prefix(identity)}.>"]
    for subject in CATALOG:
        if subject is DEADLETTER:
            continue
        if identity in subject.producers:
            publish.append(subject.name)
        if identity not in subject.consumers:
            continue
        publish.append(deadletter_subject(subject.name))
        if subject.durable:
            publish.extend(_durable_grants(identity, subject))
        else:
            subscribe.append(subject.name)
    for stream in STREAMS:
        if identity in stream.users:
            publish.extend(_stream_grants(identity, stream))
    if identity in JOURNAL_STREAM.users:
        publish.extend(JOURNAL_STREAM.subjects)
        publish.extend(_stream_grants(identity, JOURNAL_STREAM))
        publish.append(f"{JS_API}.STREAM.MSG.GET.{JOURNAL_STREAM.name}")
        # applied commits are purged from the journal; the owner alone may do that
        publish.append(f"{JS_API}.STREAM.PURGE.{JOURNAL_STREAM.name}")
    service = _service_name(identity)
    for verb in SRV_VERBS:
        subscribe.extend((f"$SRV.{verb}", f"$SRV.{verb}.{service}", f"$SRV.{verb}.{service}.*"))
    return Permissions(tuple(publish), tuple(subscribe), allow_responses=True)


def _operator_permissions() -> Permissions:
    """Read-only: discovery, stream and consumer info, reading stored messages by sequence
    (``nats stream get``), live dead letters. No consumer of its own: one created under a
    service's durable name before that service starts would be bound with the wrong config."""
    publish: list[str] = [f"{JS_API}.INFO", f"{JS_API}.STREAM.NAMES", f"{JS_API}.STREAM.LIST"]
    for verb in SRV_VERBS:
        publish.extend((f"$SRV.{verb}", f"$SRV.{verb}.>"))
    for stream in (EVENTS_STREAM, DEADLETTER_STREAM):
        publish.extend(
            (
                f"{JS_API}.STREAM.INFO.{stream.name}",
                f"{JS_API}.STREAM.MSG.GET.{stream.name}",
                f"{JS_API}.CONSUMER.NAMES.{stream.name}",
                f"{JS_API}.CONSUMER.LIST.{stream.name}",
                f"{JS_API}.CONSUMER.INFO.{stream.name}.*",
            )
        )
    subscribe = (f"{inbox_prefix(OPERATOR)}.>", DEADLETTER.name)
    return Permissions(tuple(publish), subscribe, allow_responses=False)


def permissions(identity: str) -> Permissions:
    """The permissions of one identity of ``IDENTITIES`` (``ValueError`` for any other name)."""
    if identity in SERVICES:
        return _service_permissions(identity)
    if identity == OPERATOR:
        return _operator_permissions()
    raise ValueError(f"unknown bus identity {identity!r}; known: {', '.join(IDENTITIES)}")


# --------------------------------------------------------------------------- credentials


def password_env(identity: str) -> str:
    """The environment variable the nats-server config reads an identity's password (or its
    bcrypt hash) from: ``JOBTREE_NATS_PASSWORD_BINDER``."""
    return f"JOBTREE_NATS_PASSWORD_{identity.upper()}"


def new_password() -> str:
    """A random password (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, rounds: int = 11) -> str:
    """The bcrypt hash nats-server accepts in place of a password. It is a ``$2a$`` hash: the
    nats-server config parser reads a ``$2a$…`` value from the environment as the hash, but
    takes a ``$2b$…`` one for another variable reference (the two prefixes hash the same for
    passwords shorter than 72 bytes)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds, prefix=b"2a")).decode()


@dataclass(frozen=True)
class User:
    """One NATS user of the rendered config: an identity, exactly one credential, permissions.

    ``password`` is a bcrypt hash (or a plain password); ``password_env`` names the environment
    variable nats-server reads it from instead; ``nkey`` is the public key of an nkey seed.
    """

    identity: str
    password: str | None = None
    password_env: str | None = None
    nkey: str | None = None
    grants: Permissions | None = field(default=None, compare=False)
    """Permissions other than ``permissions(identity)`` (a test's own driver identity)."""

    def __post_init__(self) -> None:
        given = [v for v in (self.password, self.password_env, self.nkey) if v is not None]
        if len(given) != 1:
            raise ValueError(f"user {self.identity}: give exactly one of password, env, nkey")

    @property
    def effective(self) -> Permissions:
        return self.grants if self.grants is not None else permissions(self.identity)


def _quote(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _render_user(user: User) -> str:
    perms = user.effective
    if user.nkey is not None:
        who = f"nkey: {json.dumps(user.nkey)}"
    elif user.password_env is not None:
        who = f"user: {json.dumps(user.identity)}, password: ${user.password_env}"
    else:
        who = f"user: {json.dumps(user.identity)}, password: {json.dumps(user.password)}"
    lines = [
        f"    {{ # {user.identity}",
        f"      {who}",
        "      permissions: {",
        f"        publish: {{ allow: {_quote(perms.publish)} }}",
        f"        subscribe: {{ allow: {_quote(perms.subscribe)} }}",
    ]
    if perms.allow_responses:
        lines.append("        allow_responses: true")
    lines += ["      }", "    }"]
    return "\n".join(lines)


def render_authorization(users: Sequence[User]) -> str:
    """The nats-server ``authorization`` block: these users and nobody else (no anonymous
    access: a client without valid credentials is refused at connect)."""
    if not users:
        raise ValueError("no users: the server would refuse everyone")
    names = [u.identity for u in users]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate identities in {names}")
    body = "\n".join(_render_user(u) for u in users)
    return f"authorization {{\n  users: [\n{body}\n  ]\n}}\n"


def env_users(identities: Sequence[str] = IDENTITIES) -> list[User]:
    """Users whose passwords (or bcrypt hashes) nats-server reads from ``password_env``: the form
    the Helm chart and the Kustomize base ship, with no secret in the file."""
    return [User(i, password_env=password_env(i)) for i in identities]


# --------------------------------------------------------------------------- Kubernetes Secrets


def _labels(identity: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "jobtree", "app.kubernetes.io/part-of": "jobtree"}
    if identity is not None:
        labels["jobtree.io/nats-identity"] = identity
    return labels


def secret_manifests(
    namespace: str, prefix: str = "jobtree", identities: Sequence[str] = IDENTITIES
) -> list[dict[str, Any]]:
    """One Secret per identity, ``<prefix>-nats-<identity>``: a fresh random ``password`` for the
    service and its ``bcrypt`` hash for nats-server (the names the Helm chart and the Kustomize
    base mount)."""
    out: list[dict[str, Any]] = []
    for identity in identities:
        password = new_password()
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": f"{prefix}-nats-{identity}",
                    "namespace": namespace,
                    "labels": _labels(identity),
                },
                "stringData": {"password": password, "bcrypt": hash_password(password)},
            }
        )
    return out


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def tls_manifests(
    namespace: str, prefix: str = "jobtree", days: int = 3650
) -> list[dict[str, Any]]:
    """A fresh CA and a server certificate for the bundled NATS Service ``<prefix>-nats``: the
    Secret ``<prefix>-nats-tls`` (tls.crt, tls.key, ca.crt) for the server and the ConfigMap
    ``<prefix>-nats-ca`` (ca.crt) the services verify it with."""
    service = f"{prefix}-nats"
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{service}-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    meta = {"namespace": namespace, "labels": _labels()}
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": f"{service}-tls", **meta},
            "stringData": {"tls.crt": _pem(cert), "tls.key": key_pem, "ca.crt": _pem(ca)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{service}-ca", **meta},
            "data": {"ca.crt": _pem(ca)},
        },
    ]


# --------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> None:
    """``jobtree-nats-auth``: print the authorization block, the permissions as JSON, or fresh
    Kubernetes Secrets for every identity."""
    parser = argparse.ArgumentParser(
        prog="jobtree-nats-auth",
        description="The NATS users and permissions Jobtree's services need.",
    )
    parser.add_argument(
        "what",
        nargs="?",
        choices=["conf", "json", "secrets"],
        default="conf",
        help="conf (default): a nats-server authorization block reading each password (or its "
        "bcrypt hash) from $JOBTREE_NATS_PASSWORD_<IDENTITY>; json: the permissions per "
        "identity; secrets: Kubernetes Secrets with fresh passwords (YAML, for kubectl apply)",
    )
    parser.add_argument(
        "--identity",
        action="append",
        choices=IDENTITIES,
        help="only these identities (repeatable; default: all)",
    )
    parser.add_argument("--namespace", default="jobtree-system", help="secrets: namespace")
    parser.add_argument(
        "--prefix", default="jobtree", help="secrets: name prefix (<prefix>-nats-<identity>)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="secrets: also a CA and server certificate for the bundled NATS",
    )
    ns = parser.parse_args(argv)
    chosen: list[str] = ns.identity or list(IDENTITIES)
    if ns.what == "json":
        out = {
            i: {
                "inbox_prefix": inbox_prefix(i),
                "publish": list(permissions(i).publish),
                "subscribe": list(permissions(i).subscribe),
                "allow_responses": permissions(i).allow_responses,
            }
            for i in chosen
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    elif ns.what == "secrets":
        docs = secret_manifests(ns.namespace, ns.prefix, chosen)
        if ns.tls:
            docs += tls_manifests(ns.namespace, ns.prefix)
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    else:
        sys.stdout.write(render_authorization(env_users(chosen)))


if __name__ == "__main__":
    main()
