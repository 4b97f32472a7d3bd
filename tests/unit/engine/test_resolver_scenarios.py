"""End-to-end stories through the lease-level engine: activation, node failure, voluntary shrink."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from shared.engine.failures import PodMove, on_node_failure
from shared.engine.lottery import draw_index, lottery_seed, token_sort_key
from shared.engine.model import DomainKey, FundingKind, Lease, Role
from shared.engine.resolver import Scope, audit_line, remedies, resolve
from shared.engine.shrink import current_width, shrink_plan
from tests.unit.engine.ledgers import DOMAIN_A, FLAVOR, T0, Ledger, elastic_run, fixed_run

NODE_GPUS = 8
CKPT = timedelta(minutes=20)


def occupancy(leases: Iterable[Lease], node: str) -> int:
    """Physical GPUs held on a node: active + max(spare, borrowed) (fill lives in spares)."""
    load = {role: 0 for role in Role}
    for lease in leases:
        if lease.node == node:
            load[lease.role] += lease.gpus
    return load[Role.ACTIVE] + max(load[Role.SPARE], load[Role.BORROWED])


def test_activation_drops_spares_shrinks_elastic_then_draws_lottery() -> None:
    nodes = [f"a{i}" for i in range(1, 7)]
    scope = Scope(FLAVOR, frozenset(nodes), "H100-80GB@us-west/gpu-a/nv-a")
    ledger = Ledger()
    job_a = fixed_run("job-a", "org:rai:sys", 8, spares=1, checkpoint=CKPT, max_restarts=2)
    ledger.group(job_a, 0, ["a1"], 8)
    ledger.spare(job_a, 0, "a2", 8)
    job_b = fixed_run("job-b", "org:rai:sys", 8, checkpoint=CKPT, max_restarts=2)
    ledger.group(job_b, 0, ["a5"], 8)
    job_c = fixed_run("job-c", "org:vision", 8)
    ledger.group(job_c, 0, ["a6"], 8)
    elastic = elastic_run("elastic", "org:nlp", min_gpus=8, max_gpus=16, step=8)
    ledger.group(elastic, 0, ["a3"], 8)
    ledger.group(
        elastic,
        1,
        ["a4"],
        8,
        envelope="org:sp/lend",
        payer_owner="org:sp",
        funding=FundingKind.SPONSOR,
    )
    reserving = ("team", "big-train")
    free = sum(NODE_GPUS - occupancy(ledger.leases, n) for n in nodes)
    deficit = 32 - free
    assert deficit == 32

    # The forecast shows the remedies before activation.
    preview = remedies(deficit, scope, ledger.leases, ledger.runs, (reserving,))
    assert preview.spare_drops == {job_a.key: 8}
    assert preview.shrinks == {elastic.key: 8}
    assert preview.deficit_after_cuts == 16 and preview.lottery_likely
    assert set(preview.conflict_set) == {job_a.key, job_b.key, job_c.key}
    assert sum(preview.kill_probability.values()) == 2  # exactly two of the three runs go

    res = resolve(
        deficit,
        scope,
        ledger.leases,
        ledger.runs,
        reservation_uid="7d0c-uid",
        activation=T0,
        protected_runs=(reserving,),
    )
    seed = lottery_seed(scope.label, "7d0c-uid", T0)
    assert res.seed == seed
    assert [a.kind for a in res.actions] == [
        "DropSpare",
        "Shrink",
        "RandomPreempt",
        "RandomPreempt",
    ]
    assert res.actions[0].lease_names == ("job-a-g0-s0",)
    assert res.actions[1].lease_names == ("elastic-g1-r1",)  # the sponsored group

    # Replay by hand from the published seed, exactly as the docs describe.
    pool = sorted(res.tokens, key=token_sort_key)
    remaining, expected = 16, []
    step = 0
    while remaining > 0:
        owners = sorted({t.owner for t in pool})
        owner = owners[draw_index(seed, step, "owner", len(owners))]
        mine = [t for t in pool if t.owner == owner]
        token = mine[draw_index(seed, step, "token", len(mine))]
        pool.remove(token)
        expected.append(token.run)
        remaining -= token.gpus
        step += 1
    assert [d.token.run for d in res.draws] == expected
    assert expected == [job_a.key, job_b.key]  # the worked example in docs/engine-resolver.md
    assert res.replays()

    # Committing the ends frees the 32 GPUs the reservation needs, in scope.
    ended = {name for name, _ in res.ended_leases}
    left = [lease for lease in ledger.leases if lease.name not in ended]
    assert sum(NODE_GPUS - occupancy(left, n) for n in nodes) == 32
    assert res.freed == 32 and res.remaining_deficit == 0
    for key in expected:
        assert key in (res.requeue if key != job_c.key else res.failed)
    line = audit_line(res, scope, "team/big-train")
    assert f"RandomPreempt({seed})" in line


def test_node_failure_swaps_onto_spare_and_reclaims_opportunistic_run() -> None:
    domains: dict[str, DomainKey] = {n: DOMAIN_A for n in ("a1", "a2", "a3", "a4")}
    ledger = Ledger()
    train = fixed_run("train", "org:rai", 16, group_gpus=16, spares=1)
    ledger.group(train, 0, ["a1", "a2"], 8, envelope="org:rai/h100")
    ledger.spare(train, 0, "a3", 8, envelope="org:rai/h100")
    opp = fixed_run("sweep", "org:intern", 8, opportunistic=True, checkpoint=CKPT, max_restarts=5)
    ledger.fill(opp, "a3", 8, envelope="org:intern/h100")
    before = {n: occupancy(ledger.leases, n) for n in domains}

    plan = on_node_failure("a2", ledger.leases, ledger.runs, node_domains=domains, now=T0)
    assert plan.ends == (
        ("sweep-g0-r0", "ReclaimedBySpare"),
        ("train-g0-s0", "Swap"),
        ("train-g0-r1", "NodeFailure"),
    )
    (swapped,) = plan.starts
    assert (swapped.node, swapped.rank, swapped.envelope, swapped.role) == (
        "a3",
        1,
        "org:rai/h100",
        Role.ACTIVE,
    )
    assert plan.pod_moves == (PodMove(train.key, 1, "a2", "a3"),)
    assert plan.requeue == (opp.key,) and plan.reasons == {opp.key: "ReclaimedBySpare"}

    ended = {name for name, _ in plan.ends}
    after = [lease for lease in ledger.leases if lease.name not in ended]
    after.append(swapped.to_lease("train-g0-r1-swap"))
    assert current_width([lease for lease in after if lease.run == train.key]) == 16
    for node in ("a1", "a3", "a4"):
        assert occupancy(after, node) <= before[node] <= NODE_GPUS


def test_elastic_run_shrinks_on_request_borrowed_first() -> None:
    ledger = Ledger()
    run = elastic_run("elastic", "org:nlp", min_gpus=8, max_gpus=32, step=8, spares=1)
    ledger.group(run, 0, ["a1"], 8)
    ledger.group(run, 1, ["a2"], 8, payer_owner="org:sp", funding=FundingKind.SPONSOR)
    ledger.group(run, 2, ["a3"], 8, payer_owner="org:nlp:sib", funding=FundingKind.FAMILY)
    ledger.group(run, 3, ["a4"], 8)
    ledger.spare(run, 1, "a5", 8, payer_owner="org:sp", funding=FundingKind.SPONSOR)
    leases = ledger.run_leases(run)
    # kubectl runs shrink --to 16: the sponsored group goes first (with its spare), then group 3.
    assert shrink_plan(run, leases, 16) == ("elastic-g1-r1", "elastic-g1-s0", "elastic-g3-r3")
    # kubectl runs shrink --by 8 is --to (width - 8).
    assert shrink_plan(run, leases, current_width(leases) - 8) == ("elastic-g1-r1", "elastic-g1-s0")
    # Asking for less than min stops at min.
    ended = set(shrink_plan(run, leases, 0))
    assert current_width([lease for lease in leases if lease.name not in ended]) == 8
