"""What-if for a Run that does not exist yet (`kubectl runs plan -f run.yaml`), read-only.

The very functions the services run on the same snapshot: ``try_start`` (would it start now,
where, who pays), else ``forecast`` (the guaranteed ETA, what it rests on, the deficit, the Runs
activation would put at risk and their kill probabilities) and ``expected_start`` (the expected
start learnt from the ledger). Nothing is written; Slurm's ``sbatch --test-only`` is the model.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shared.engine.admit import Start, try_start
from shared.engine.durations import expected_start, learn
from shared.engine.forecast import forecast
from shared.engine.model import RunRequest, run_label
from shared.engine.state import ClusterState
from shared.kube.translate import rfc3339


def _seconds(at: datetime, now: datetime) -> int:
    return max(0, int((at - now).total_seconds()))


def what_if(request: RunRequest, state: ClusterState) -> dict[str, Any]:
    """The plan record of a hypothetical Run: start now (where, who pays) or when and at whose
    risk."""
    out: dict[str, Any] = {"run": run_label(request.key), "owner": request.owner}
    got = try_start(request, state)
    if isinstance(got, Start):
        out.update(
            startsNow=True,
            width=got.width,
            nodes=dict(got.placement.by_node()),
            paying=dict(got.placement.by_envelope()),
        )
        return out
    fc = forecast(request, state, got)
    guess = expected_start(request, state, learn(state.ledger), fc.earliest_start)
    risk = fc.remedies.kill_probability
    out.update(
        startsNow=False,
        stage=got.stage,
        reason=got.reason,
        message=got.message,
        earliestStart=rfc3339(fc.earliest_start),
        earliestStartInSeconds=_seconds(fc.earliest_start, state.now),
        confidence=fc.confidence.value,
        expected={
            "expectedStart": rfc3339(guess.at),
            "p10": rfc3339(guess.p10),
            "p90": rfc3339(guess.p90),
            "basis": guess.basis,
            "inSeconds": _seconds(guess.at, state.now),
            "spreadSeconds": [_seconds(guess.p10, state.now), _seconds(guess.p90, state.now)],
        },
        deficitGPUs=fc.deficit_gpus,
        scope=fc.scope.label,
        paying=fc.paying_envelope or fc.funding_scope_envelope,
        slice=sorted(fc.placement.by_node()) if fc.placement is not None else [],
        atRisk=[
            {"run": run_label(key), "killProbability": round(risk.get(key, 0.0), 4)}
            for key in fc.remedies.conflict_set
        ],
        lotteryLikely=fc.remedies.lottery_likely,
        openClaims=list(fc.open_claims),
    )
    return out
