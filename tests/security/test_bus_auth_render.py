"""The permission renderer and the credential settings, without a running server (except
``nats-server -t``, which checks that the rendered config parses)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import nkeys
import pytest

from shared.bus.auth import (
    Permissions,
    User,
    env_users,
    main,
    password_env,
    permissions,
    render_authorization,
)
from shared.bus.config import BusCredentials, service_args
from shared.bus.subjects import (
    ACTIVATE,
    CATALOG,
    COMMIT,
    DEADLETTER,
    IDENTITIES,
    JOURNAL_STREAM,
    NODE_FAILED,
    OPERATOR,
    SERVICES,
    STREAMS,
    consumer_name,
    deadletter_subject,
    inbox_prefix,
    stream_of,
)
from shared.localenv.natsserver import nats_server_binary, server_config


def publishers(subject: str) -> set[str]:
    return {i for i in IDENTITIES if subject in permissions(i).publish}


def subscribers(subject: str) -> set[str]:
    return {i for i in IDENTITIES if subject in permissions(i).subscribe}


def test_every_subject_has_its_producers_and_consumers_permitted() -> None:
    for subject in CATALOG:
        if subject is DEADLETTER:
            continue
        assert publishers(subject.name) == set(subject.producers), subject.name
        for consumer in subject.consumers:
            grants = permissions(consumer)
            if subject.durable:
                name = consumer_name(consumer, subject)
                stream = stream_of(subject).name
                assert f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}" in grants.publish
                assert f"$JS.ACK.{stream}.{name}.>" in grants.publish
            else:
                assert subject.name in grants.subscribe, (consumer, subject.name)
            assert deadletter_subject(subject.name) in grants.publish, (consumer, subject.name)
        if not subject.durable:
            assert subscribers(subject.name) == set(subject.consumers), subject.name
    assert subscribers(DEADLETTER.name) == {OPERATOR}


def test_the_issue_s_rules_hold() -> None:
    assert publishers(COMMIT.name) == {"admission", "resolver"}
    assert subscribers(COMMIT.name) == {"binder"}
    assert publishers(NODE_FAILED.name) == {"packer"}
    assert publishers(ACTIVATE.name) == {"forecast"}
    journal = {i for i in IDENTITIES if any("JOURNAL" in g for g in permissions(i).publish)}
    assert journal == {"binder"}
    assert publishers(JOURNAL_STREAM.subjects[0]) == {"binder"}


def test_no_identity_gets_a_blanket_grant() -> None:
    for identity in IDENTITIES:
        grants = permissions(identity)
        for subject in (*grants.publish, *grants.subscribe):
            tokens = subject.split(".")
            assert subject not in (">", "*"), identity
            assert tokens[0] not in ("*", ">"), (identity, subject)
            assert not subject.startswith("$JS.API.>"), (identity, subject)
            assert ".DELETE." not in subject, (identity, subject)
            if ".PURGE." in subject:
                assert (identity, subject) == (
                    "binder",
                    f"$JS.API.STREAM.PURGE.{JOURNAL_STREAM.name}",
                )
        # its own inbox and nobody else's
        inboxes = [s for s in grants.subscribe if s.startswith("_INBOX")]
        assert inboxes == [f"{inbox_prefix(identity)}.>"], identity
        assert not any(s.startswith("_INBOX") for s in grants.publish), identity


def test_only_owners_update_streams_and_users_create_them() -> None:
    for stream in STREAMS:
        update = f"$JS.API.STREAM.UPDATE.{stream.name}"
        create = f"$JS.API.STREAM.CREATE.{stream.name}"
        assert publishers(update) == {stream.owner}
        assert publishers(create) == set(stream.users)


def test_the_operator_only_reads() -> None:
    grants = permissions(OPERATOR)
    assert not grants.allow_responses
    for subject in grants.publish:
        assert subject.startswith(("$SRV.", "$JS.API.")), subject
        assert not any(verb in subject for verb in ("CREATE", "UPDATE", "DELETE", "PURGE"))
    assert not any(s.startswith("jobtree.") for s in grants.publish)


def test_unknown_identity_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown bus identity"):
        permissions("mallory")


def test_render_gives_each_user_one_credential() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        User("binder", password="x", nkey="UABC")
    with pytest.raises(ValueError, match="duplicate"):
        render_authorization([User("binder", password="x"), User("binder", password="y")])
    with pytest.raises(ValueError, match="no users"):
        render_authorization([])
    text = render_authorization(env_users())
    for identity in IDENTITIES:
        assert f"password: ${password_env(identity)}" in text
    assert "no_auth_user" not in text


def test_the_rendered_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    """``nats-server -t``: the real parser, with the passwords from the environment."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    extra = User("extra", nkey=public, grants=Permissions(("a.b",), ("c.d",), False))
    users = [*env_users(), extra]
    conf = tmp_path / "nats.conf"
    conf.write_text(
        server_config(
            port=4222,
            monitor_port=8222,
            store_dir=tmp_path / "js",
            authorization=render_authorization(users),
        )
    )
    env = {password_env(i): f"secret-{i}" for i in IDENTITIES}
    done = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_command_prints_the_same_block_and_json() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        main([])
    assert out.getvalue() == render_authorization(env_users())
    out = io.StringIO()
    with redirect_stdout(out):
        main(["json", "--identity", "binder"])
    data = json.loads(out.getvalue())
    assert list(data) == ["binder"]
    assert data["binder"]["publish"] == list(permissions("binder").publish)
    assert data["binder"]["inbox_prefix"] == "_INBOX.binder"


# --------------------------------------------------------------------------- credentials


def test_credentials_refuse_ambiguous_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only one of"):
        BusCredentials(user="binder", password="x", nkey_seed_file="seed.nk")
    with pytest.raises(ValueError, match="needs a user"):
        BusCredentials(password="x")
    with pytest.raises(ValueError, match="both"):
        BusCredentials(tls_cert_file="c.pem")
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    opts = BusCredentials(user="binder", password_file=str(secret)).connect_options()
    assert opts == {"user": "binder", "password": "s3cret"}
    assert BusCredentials().connect_options() == {}
    assert "s3cret" not in repr(BusCredentials(user="binder", password="s3cret"))


def test_service_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("JOBTREE_NATS_USER", "JOBTREE_NATS_PASSWORD", "JOBTREE_NATS_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JOBTREE_NATS_USER", "packer")
    monkeypatch.setenv("JOBTREE_NATS_PASSWORD", "from-env")
    cfg = service_args("packer", [])
    assert cfg.credentials.connect_options() == {"user": "packer", "password": "from-env"}
    secret = tmp_path / "pw"
    secret.write_text("from-file")
    cfg = service_args("packer", [f"--nats-password-file={secret}"])
    assert cfg.credentials.connect_options()["password"] == "from-file"
    seed = tmp_path / "seed.nk"
    with pytest.raises(SystemExit):  # the password in the environment and an nkey: which one?
        service_args("packer", [f"--nats-nkey-seed-file={seed}", "--nats-user="])
    monkeypatch.delenv("JOBTREE_NATS_PASSWORD")
    cfg = service_args("packer", [f"--nats-nkey-seed-file={seed}", "--nats-user="])
    assert cfg.credentials.connect_options() == {"nkeys_seed": str(seed)}
    with pytest.raises(SystemExit):  # a password file and an nkey: which identity?
        service_args("packer", [f"--nats-password-file={secret}", f"--nats-nkey-seed-file={seed}"])


def test_every_service_is_an_identity() -> None:
    assert set(SERVICES) < set(IDENTITIES)
