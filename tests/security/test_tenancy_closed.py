"""Attack: a Run in a namespace nobody authorised (no ``rq.davidlangworthy.io/owners``
annotation) naming an owner whose budget it would spend. Tenancy is closed: the webhook refuses
it, admission's reconcile fails it when the webhook is bypassed, and no Lease or Pod appears.
The same owner in an authorised namespace binds (tests/security/test_pods_policy.py), so the
budget and nodes were there to take."""

from __future__ import annotations

import pytest

from tests.security.conftest import (
    DIRECT_BARE,
    HOOKED_BARE,
    OWNER,
    SecureStack,
    leases_of,
    pods_of,
    run_manifest,
    run_status,
    try_apply,
)
from tests.service import helpers as h

pytestmark = pytest.mark.kube

NOBODY = "it may name no owners (the default owner globs (no annotation))"


def test_the_webhook_refuses_an_unannotated_namespace(secure: SecureStack) -> None:
    done = try_apply(secure, run_manifest(HOOKED_BARE, "squatter", None))
    assert done.returncode != 0, done.stdout
    assert (
        f"Unauthorized: namespace '{HOOKED_BARE}' is not authorised for owner '{OWNER}'; {NOBODY}"
        in done.stderr
    )
    assert secure.kubectl("get", h.RUNS, "-n", HOOKED_BARE, "squatter", check=False).returncode != 0
    assert leases_of(secure, HOOKED_BARE, "squatter") == []


def test_the_reconcile_fails_a_run_in_an_unannotated_namespace(secure: SecureStack) -> None:
    done = try_apply(secure, run_manifest(DIRECT_BARE, "squatter", None))
    assert done.returncode == 0, done.stderr
    status = run_status(secure, DIRECT_BARE, "squatter", "Failed")
    assert status["message"] == (
        f"Unauthorized: namespace '{DIRECT_BARE}' is not authorised for owner '{OWNER}'; {NOBODY}"
    )
    assert next(c for c in status["conditions"] if c["type"] == "Unauthorized")["status"] == "True"
    assert leases_of(secure, DIRECT_BARE, "squatter") == []
    assert pods_of(secure, DIRECT_BARE, "squatter") == []
