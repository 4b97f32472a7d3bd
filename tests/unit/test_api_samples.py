"""The shipped samples: valid, at the seed's paths, and a coherent story on the local fleet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from shared.api import Budget, Reservation, Run, load_file
from shared.api.budget import Envelope
from shared.api.kinds import JobtreeObject
from shared.engine.family import Family
from shared.kube.translate import budget_record

SAMPLES = Path(__file__).resolve().parents[2] / "config" / "samples"
# Named by the cluster administrator guide; must exist at exactly these paths.
SEED_PATHS = (
    "budgets/budget-west-h100.yaml",
    "budgets/budget-vision-lending.yaml",
    "runs/run-128-groups.yaml",
    "runs/run-cofunded-128.yaml",
    "reservations/reservation-example.yaml",
)
# The local fleet of the admin guide: 16 nodes × 8 GPUs per fabric domain.
DOMAINS = {
    ("us-west", "gpu-a", "nv-a"): [f"gpu-a-{i:02d}" for i in range(1, 17)],
    ("us-west", "gpu-b", "nv-b"): [f"gpu-b-{i:02d}" for i in range(1, 17)],
}
GPUS_PER_NODE = 8


def all_samples() -> list[Path]:
    return sorted(SAMPLES.rglob("*.yaml"))


def one(path: str) -> JobtreeObject:
    [obj] = load_file(SAMPLES / path)
    return obj


def budgets() -> list[Budget]:
    return [b for p in all_samples() for b in load_file(p) if isinstance(b, Budget)]


def usable_now(env: Envelope) -> bool:
    now = datetime.now(UTC)
    return (env.start is None or env.start <= now) and (env.end is None or now < env.end)


def domain_of(env: Envelope) -> tuple[str, str, str]:
    sel = env.selector
    return (sel["region"], sel["cluster"], sel["fabric.domain"])


def test_seed_paths_exist() -> None:
    for path in SEED_PATHS:
        assert (SAMPLES / path).is_file(), path


@pytest.mark.parametrize("path", all_samples(), ids=lambda p: str(p.relative_to(SAMPLES)))
def test_every_sample_validates_and_round_trips(path: Path) -> None:
    objects = load_file(path)
    assert objects
    for obj in objects:
        assert obj.metadata.name
        assert obj.metadata.namespace is None, "samples leave the namespace to kubectl"
        assert type(obj).parse(obj.dump()) == obj


def test_envelopes_select_real_domains_of_the_fleet() -> None:
    for budget in budgets():
        for env in budget.spec.envelopes:
            assert env.flavor == "H100-80GB"
            assert domain_of(env) in DOMAINS
            assert env.concurrency <= len(DOMAINS[domain_of(env)]) * GPUS_PER_NODE


def test_west_h100_has_a_14_day_window_within_its_bound() -> None:
    budget = one("budgets/budget-west-h100.yaml")
    assert isinstance(budget, Budget) and budget.spec.owner == "org:ai:rai:sys"
    windowed = [e for e in budget.spec.envelopes if e.start and e.end]
    assert windowed
    for env in windowed:
        assert env.start and env.end and env.end - env.start == timedelta(days=14)
        assert env.max_gpu_hours is not None and env.pre_activation is not None
        assert not usable_now(env), "a future window must not change the 96/32 story"


def test_run_128_groups_fits_with_96_owned_and_32_borrowed() -> None:
    """The split the admin guide's sponsor flow expects, derived from the sample numbers."""
    for path in ("runs/run-128-groups.yaml", "runs/run-cofunded-128.yaml"):
        run = one(path)
        assert isinstance(run, Run)
        spec = run.spec
        assert spec.resources.total_gpus == 128
        owned = sum(
            e.concurrency
            for b in budgets()
            if b.spec.owner == spec.owner
            for e in b.spec.envelopes
            if usable_now(e) and e.flavor == spec.resources.gpu_type
        )
        assert spec.funding is not None and spec.funding.allow_borrow
        assert spec.funding.max_borrow_gpus is not None and spec.funding.sponsors
        lendable = sum(
            min(e.lending.max_concurrency or e.concurrency, e.concurrency)
            for b in budgets()
            if b.spec.owner in spec.funding.sponsors
            for e in b.spec.envelopes
            if e.lending
            and e.lending.allow
            and e.lending.to
            and any(fnmatchcase(spec.owner, glob) for glob in e.lending.to)
        )
        borrowed = min(lendable, spec.funding.max_borrow_gpus)
        assert (owned, borrowed) == (96, 32), path
        # Sponsors must not be family, or cover would use them in a family step instead: the
        # samples' Budgets form no tree joining them (a shared "org" prefix relates nobody).
        family = Family(budget_record(b.dump()) for b in budgets())
        assert not any(family.is_family(spec.owner, s) for s in spec.funding.sponsors)


def test_reservation_example_names_nodes_of_its_domain() -> None:
    resv = one("reservations/reservation-example.yaml")
    assert isinstance(resv, Reservation)
    dom = resv.spec.intended_slice.domain
    nodes = DOMAINS[(dom["region"], dom["cluster"], dom["fabric.domain"])]
    assert resv.spec.intended_slice.nodes == nodes[:8]
    assert resv.spec.run_ref.name == "run-128-groups"
    assert resv.spec.earliest_start <= datetime.now(UTC), "activates as soon as it is applied"


def test_run_with_template_has_a_real_workload() -> None:
    run = one("runs/run-with-template.yaml")
    assert isinstance(run, Run) and run.spec.template is not None
    [container] = run.spec.template["spec"]["containers"]
    assert container["image"] and container["command"]


def test_run_with_spares_declares_spares() -> None:
    run = one("runs/run-with-spares.yaml")
    assert isinstance(run, Run) and run.spec.spares_per_group > 0
