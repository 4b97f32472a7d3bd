"""The pydantic API models: defaults, invariants and field-path error messages."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.api import (
    ApiValidationError,
    Budget,
    Lease,
    Reservation,
    Run,
    load_manifests,
    parse_duration,
    parse_object,
)
from shared.api.base import camel_alias
from shared.api.lease import ClosureReason, lease_labels, random_preempt
from shared.api.run import RunPhase

ENVELOPE: dict[str, Any] = {
    "name": "west",
    "flavor": "H100-80GB",
    "selector": {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"},
    "concurrency": 64,
}
BUDGET: dict[str, Any] = {
    "apiVersion": "rq.davidlangworthy.io/v1",
    "kind": "Budget",
    "metadata": {"name": "west-h100"},
    "spec": {"owner": "org:ai:rai:sys", "envelopes": [ENVELOPE]},
}
RUN: dict[str, Any] = {
    "apiVersion": "rq.davidlangworthy.io/v1",
    "kind": "Run",
    "metadata": {"name": "train", "namespace": "default"},
    "spec": {"owner": "org:ai:rai:sys", "resources": {"gpuType": "H100-80GB", "totalGPUs": 64}},
}
LEASE: dict[str, Any] = {
    "apiVersion": "rq.davidlangworthy.io/v1",
    "kind": "Lease",
    "metadata": {"name": "train-g0-r0"},
    "spec": {
        "owner": "org:ai:rai:sys",
        "runRef": {"name": "train", "namespace": "default"},
        "compPath": ["SHARD[1]", "D"],
        "slice": {"nodes": ["gpu-a-01"], "gpus": 8, "role": "Active"},
        "interval": {"start": "2026-11-28T10:00:00Z"},
        "paidByEnvelope": "west",
        "paidByBudget": "west-h100",
        "paidByOwner": "org:ai:rai:sys",
        "reason": "Start",
    },
}


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set (``None`` deletes it)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split("/")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


def error_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ApiValidationError) as info:
        parse_object(doc)
    return str(info.value)


def test_aliases_spell_gpu_in_capitals() -> None:
    assert camel_alias("max_gpu_hours") == "maxGPUHours"
    assert camel_alias("total_gpus") == "totalGPUs"
    assert camel_alias("gpu_type") == "gpuType"
    assert camel_alias("gpu_hours") == "gpuHours"
    assert camel_alias("allow_cross_group_spread") == "allowCrossGroupSpread"
    assert camel_alias("borrowed_out") == "borrowedOut"


def test_budget_parses_and_round_trips() -> None:
    budget = Budget.parse(BUDGET)
    assert budget.spec.envelopes[0].concurrency == 64
    assert budget.spec.parents is None
    assert Budget.parse(budget.dump()) == budget
    assert budget.dump()["spec"]["envelopes"][0]["selector"]["fabric.domain"] == "nv-a"


def test_populate_by_name_accepts_python_names() -> None:
    run = Run.model_validate(
        {"spec": {"owner": "org:ai", "resources": {"gpu_type": "H100-80GB", "total_gpus": 8}}}
    )
    assert run.spec.resources.total_gpus == 8
    assert run.dump()["spec"]["resources"] == {"gpuType": "H100-80GB", "totalGPUs": 8}


def test_explicit_parents_parse() -> None:
    assert Budget.parse(with_(BUDGET, "spec/parents", ["org:ml"])).spec.parents == ["org:ml"]


def test_budget_defaults() -> None:
    env = with_(ENVELOPE, "lending", {"to": ["org:ai:*"]})
    env["preActivation"] = {}
    budget = Budget.parse(with_(BUDGET, "spec/envelopes", [env]))
    envelope = budget.spec.envelopes[0]
    assert envelope.lending is not None and envelope.lending.allow is False
    assert envelope.pre_activation is not None
    assert not envelope.pre_activation.allow_reservations
    assert not envelope.pre_activation.allow_admission


def test_run_defaults() -> None:
    doc = with_(RUN, "spec/locality", {"groupGPUs": 32})
    doc["spec"]["runtime"] = {"checkpoint": "30m"}
    doc["spec"]["malleable"] = {"minTotalGPUs": 32, "maxTotalGPUs": 128, "stepGPUs": 32}
    spec = Run.parse(doc).spec
    assert spec.locality is not None and spec.locality.allow_cross_group_spread is True
    assert spec.runtime is not None and spec.runtime.max_restarts == 0
    assert spec.malleable is not None and spec.malleable.desired_total_gpus == 128
    assert spec.spares_per_group == 0
    assert spec.opportunistic is False
    assert spec.template is None


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec/owner", None, "spec.owner: Field required"),
        ("spec/owner", "Org:AI", "spec.owner: String should match pattern"),
        ("spec/envelopes/0/concurrency", 0, "spec.envelopes[0].concurrency: Input should be"),
        ("spec/envelopes/0/concurrency", "64", "spec.envelopes[0].concurrency: Input should be"),
        ("spec/envelopes/0/selector", {}, "spec.envelopes[0].selector: Dictionary should"),
        (
            "spec/envelopes/0/selector",
            {"zone": "a"},
            "spec.envelopes[0].selector: keys must be topology labels: region, cluster, "
            "fabric.domain, rack, gpu.flavor (got zone)",
        ),
        ("spec/envelopes/0/colour", "red", "spec.envelopes[0].colour: Extra inputs"),
        ("spec/envelopes/0/lending", {"allow": True}, "spec.envelopes[0].lending.to must list"),
    ],
)
def test_budget_errors_name_the_field(path: str, value: Any, message: str) -> None:
    assert message in error_of(with_(BUDGET, path, value))


def test_window_bound_message_names_field_and_numbers() -> None:
    env = {
        **ENVELOPE,
        "start": "2027-01-04T00:00:00Z",
        "end": "2027-01-05T00:00:00Z",
        "maxGPUHours": 2000,
    }
    message = error_of(with_(BUDGET, "spec/envelopes", [env]))
    assert (
        "spec.envelopes[0].maxGPUHours exceeds concurrency × window hours "
        "(2000 > 64 GPUs × 24h = 1536)" in message
    )


def test_window_must_be_ordered() -> None:
    env = {**ENVELOPE, "start": "2027-01-05T00:00:00Z", "end": "2027-01-04T00:00:00Z"}
    assert "spec.envelopes[0].end must be after start" in error_of(
        with_(BUDGET, "spec/envelopes", [env])
    )


@given(
    concurrency=st.integers(1, 1024),
    seconds=st.integers(1, 60 * 86400),
    hours=st.floats(0, 2e6, allow_nan=False),
)
def test_window_bound_is_exactly_concurrency_times_hours(
    concurrency: int, seconds: int, hours: float
) -> None:
    start = datetime(2027, 1, 4, tzinfo=UTC)
    env = {
        **ENVELOPE,
        "concurrency": concurrency,
        "start": start,
        "end": start + timedelta(seconds=seconds),
        "maxGPUHours": hours,
    }
    doc = with_(BUDGET, "spec/envelopes", [env])
    if hours <= concurrency * seconds / 3600:
        parse_object(doc)
    else:
        assert "maxGPUHours exceeds" in error_of(doc)


def test_duplicate_envelopes_and_cap_references() -> None:
    assert "spec.envelopes[1] duplicate value ('west')" in error_of(
        with_(BUDGET, "spec/envelopes", [ENVELOPE, ENVELOPE])
    )
    cap = {"name": "total", "flavor": "H100-80GB", "envelopes": ["east"], "maxConcurrency": 8}
    assert "spec.aggregateCaps must name envelopes" in error_of(
        with_(BUDGET, "spec/aggregateCaps", [cap])
    )
    unbounded = {"name": "total", "flavor": "H100-80GB", "envelopes": ["west"]}
    assert "spec.aggregateCaps[0]: an aggregate cap needs" in error_of(
        with_(BUDGET, "spec/aggregateCaps", [unbounded])
    )


def test_lending_sub_caps_bounded_by_envelope() -> None:
    env = {**ENVELOPE, "lending": {"allow": True, "to": ["org:*"], "maxConcurrency": 65}}
    assert "spec.envelopes[0].lending.maxConcurrency must not exceed" in error_of(
        with_(BUDGET, "spec/envelopes", [env])
    )


@pytest.mark.parametrize(
    ("malleable", "total", "message"),
    [
        ({"minTotalGPUs": 96, "maxTotalGPUs": 64, "stepGPUs": 32}, 64, "maxTotalGPUs must be >="),
        (
            {"minTotalGPUs": 32, "maxTotalGPUs": 100, "stepGPUs": 32},
            64,
            "spec.malleable.maxTotalGPUs must be minTotalGPUs plus a multiple of stepGPUs",
        ),
        (
            {"minTotalGPUs": 32, "maxTotalGPUs": 128, "stepGPUs": 32, "desiredTotalGPUs": 80},
            64,
            "spec.malleable.desiredTotalGPUs must be minTotalGPUs plus a multiple of stepGPUs "
            "(80 is off the 32 + n × 32 grid)",
        ),
        (
            {"minTotalGPUs": 32, "maxTotalGPUs": 128, "stepGPUs": 32, "desiredTotalGPUs": 160},
            64,
            "spec.malleable.desiredTotalGPUs must be within [minTotalGPUs, maxTotalGPUs]",
        ),
        (
            {"minTotalGPUs": 32, "maxTotalGPUs": 128, "stepGPUs": 32},
            16,
            "spec.resources.totalGPUs must be within [malleable.minTotalGPUs, "
            "malleable.maxTotalGPUs] (16 not in [32, 128])",
        ),
        (
            {"minTotalGPUs": 32, "maxTotalGPUs": 128, "stepGPUs": 32},
            48,
            "spec.resources.totalGPUs must be malleable.minTotalGPUs plus a multiple",
        ),
    ],
)
def test_malleable_invariants(malleable: dict[str, int], total: int, message: str) -> None:
    doc = with_(RUN, "spec/malleable", malleable)
    doc["spec"]["resources"]["totalGPUs"] = total
    assert message in error_of(doc)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec/resources/totalGPUs", 0, "spec.resources.totalGPUs: Input should be greater"),
        ("spec/locality", {"groupGPUs": 0}, "spec.locality.groupGPUs: Input should be greater"),
        ("spec/sparesPerGroup", -1, "spec.sparesPerGroup: Input should be greater"),
        ("spec/runtime", {"checkpoint": "30 minutes"}, "spec.runtime.checkpoint: String should"),
        ("spec/runtime", {"maxDuration": "0s"}, "spec.runtime.maxDuration: must be a positive"),
        ("spec/funding", {"maxBorrowGPUs": 0}, "spec.funding.maxBorrowGPUs: Input should be"),
        ("spec/funding", {"allowBorrow": "yes"}, "spec.funding.allowBorrow: Input should be"),
        ("spec/funding", {"sponsors": ["a", "a"]}, "spec.funding.sponsors[1] duplicate value"),
        ("spec/priority", 10, "spec.priority: Extra inputs are not permitted"),
        ("spec/template", "image: x", "spec.template: Input should be a valid dictionary"),
        ("spec/after", ["train"], "spec.after must not name the Run itself"),
    ],
)
def test_run_errors_name_the_field(path: str, value: Any, message: str) -> None:
    assert message in error_of(with_(RUN, path, value))


def test_run_template_is_kept_verbatim() -> None:
    template = {"spec": {"containers": [{"name": "x", "image": "busybox", "command": ["true"]}]}}
    run = Run.parse(with_(RUN, "spec/template", template))
    assert run.dump()["spec"]["template"] == template


def test_reservation_domain_and_nodes() -> None:
    doc: dict[str, Any] = {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Reservation",
        "metadata": {"name": "r"},
        "spec": {
            "runRef": {"name": "train"},
            "intendedSlice": {
                "domain": {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"},
                "nodes": ["gpu-a-01"],
            },
            "payingEnvelope": "west-h100/west",
            "earliestStart": "2027-01-04T00:00:00Z",
        },
    }
    assert isinstance(parse_object(doc), Reservation)
    wrong = with_(doc, "spec/intendedSlice/domain", {"region": "a", "cluster": "b", "rack": "c"})
    assert "spec.intendedSlice.domain: keys must be exactly region, cluster, fabric.domain" in (
        error_of(wrong)
    )
    naive = with_(doc, "spec/earliestStart", "2027-01-04T00:00:00")
    assert "spec.earliestStart: Input should have timezone info" in error_of(naive)


def test_lease_status_rules_and_closure_reasons() -> None:
    lease = Lease.parse(LEASE)
    assert lease.status is None
    status = {"closed": True, "endTime": "2026-11-28T11:00:00Z"}
    closed = with_(LEASE, "status", {**status, "closureReason": random_preempt("ab12")})
    assert Lease.parse(closed).status is not None
    for reason in ClosureReason:
        if reason is not ClosureReason.RANDOM_PREEMPT:
            Lease.parse(with_(closed, "status/closureReason", reason.value))
    assert "status.closureReason: String should match" in error_of(
        with_(closed, "status/closureReason", "RandomPreempt")
    )
    assert "status.closed requires endTime and closureReason" in error_of(
        with_(closed, "status/endTime", None)
    )
    assert "status.endTime may only be set when closed is true" in error_of(
        with_(closed, "status/closed", False)
    )
    assert "status.endTime must not be before spec.interval.start" in error_of(
        with_(closed, "status/endTime", "2026-11-28T09:00:00Z")
    )
    assert "spec.slice.role: Input should be 'Active', 'Spare' or 'Borrowed'" in error_of(
        with_(LEASE, "spec/slice/role", "Primary")
    )
    assert "spec.runRef.namespace: Field required" in error_of(
        with_(LEASE, "spec/runRef/namespace", None)
    )


def test_lease_labels_are_valid_label_values() -> None:
    labels = lease_labels(Lease.parse(LEASE).spec)
    assert labels["rq.davidlangworthy.io/owner"] == "org.ai.rai.sys"
    assert labels["rq.davidlangworthy.io/node"] == "gpu-a-01"
    assert labels["rq.davidlangworthy.io/role"] == "Active"
    long_name = with_(LEASE, "spec/runRef/name", "r" * 200)
    value = lease_labels(Lease.parse(long_name).spec)["rq.davidlangworthy.io/run"]
    assert len(value) <= 63 and value.startswith("r" * 50)


def test_status_models_tolerate_unknown_fields_but_specs_do_not() -> None:
    run = Run.parse(with_(RUN, "status", {"phase": "Running", "futureField": 1}))
    assert run.status is not None and run.status.phase is RunPhase.RUNNING
    assert "spec.futureField: Extra inputs" in error_of(with_(RUN, "spec/futureField", 1))


def test_parse_object_rejects_foreign_kinds() -> None:
    assert "apiVersion/kind" in error_of({"apiVersion": "v1", "kind": "Pod"})
    assert "apiVersion/kind" in error_of({**RUN, "apiVersion": "rq.davidlangworthy.io/v2"})


def test_load_manifests_reads_every_document() -> None:
    text = "---\n".join(
        [
            "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\nmetadata: {name: a}\n"
            "spec: {owner: org:ai, resources: {gpuType: H100-80GB, totalGPUs: 8}}\n",
            "",
            "apiVersion: rq.davidlangworthy.io/v1\nkind: Budget\nmetadata: {name: b}\n"
            "spec:\n  owner: org:ai\n  envelopes:\n  - {name: e, flavor: H100-80GB,"
            " selector: {region: us-west}, concurrency: 8, start: 2027-01-04T00:00:00Z}\n",
        ]
    )
    kinds = [type(obj).__name__ for obj in load_manifests(text)]
    assert kinds == ["Run", "Budget"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("4h", timedelta(hours=4)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d12h", timedelta(days=2, hours=12)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "30", "1.5h", "30 m", "1m1h", "4hours", "-1h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@given(st.lists(st.integers(0, 10_000), min_size=4, max_size=4))
def test_parse_duration_round_trips_components(parts: list[int]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in zip(parts, "dhms", strict=True))
    days, hours, minutes, seconds = parts
    assert parse_duration(text) == timedelta(
        days=days, hours=hours, minutes=minutes, seconds=seconds
    )
