"""The seeded, published, replayable two-stage lottery (SPEC §3 Activation and resolver).

Everything here is defined by SHA-256 over plain UTF-8 strings so that anyone — in any language,
with only the published seed and token list — can replay a lottery and check it matched.
Python's ``random`` is deliberately not used for lotteries: its generator is an implementation
detail. (Only the *estimate* of kill probabilities may sample with it; no outcome depends on it.)

Seed::

    seed = hex(SHA-256(utf8(scope + "\\n" + reservation_uid + "\\n" + activation_utc)))
    activation_utc = "YYYY-MM-DDTHH:MM:SSZ"          (whole seconds)
                   | "YYYY-MM-DDTHH:MM:SS.ffffffZ"   (when microseconds are non-zero)

Naive datetimes are read as UTC; aware ones are converted to UTC first.

Draw (uniform index in ``[0, n)``; rejection sampling, so exactly uniform)::

    for k = 0, 1, 2, ...:
        msg = seed + "|" + step + "|" + stage            (k = 0)
        msg = seed + "|" + step + "|" + stage + "|" + k  (k > 0, only after a rejection)
        x = SHA-256(utf8(msg)) read as a 256-bit big-endian unsigned integer
        if x < 2**256 - (2**256 mod n): return x mod n

``step`` is the 0-based draw number written in decimal; ``stage`` is ``"owner"`` or ``"token"``.
A rejection happens with probability below n / 2**256, i.e. never in practice.

Lottery: while the deficit is positive and some token is drawable, pick an owner with
``draw_index(seed, step, "owner", #owners)`` among the owners that still hold a drawable token
(owners sorted by code point), then one of that owner's drawable tokens with
``draw_index(seed, step, "token", #tokens)`` (tokens sorted by :func:`token_sort_key`), remove it
and subtract its GPUs from the deficit.

Malleable tokens (``group`` set and ``run_slack`` set): a group of a malleable run is drawable only
while removing it keeps the run at or above its minimum, i.e. while the GPUs already drawn from that
run plus this group's ``width`` stay ``<= run_slack``. After each draw, tokens that would now take
their run below its minimum stop being drawable. A whole-run token (``group is None``: a fixed-width
run, an AND bundle) is exclusive with the other tokens of its run.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.engine.model import RunKey

OWNER_STAGE = "owner"
TOKEN_STAGE = "token"
_SPACE = 1 << 256
KILL_PROBABILITY_MAX_STATES = 20_000
"""Largest bound on distinct lottery states for which the kill probability is computed exactly."""
KILL_PROBABILITY_SAMPLES = 1_600
"""Sampled lotteries otherwise: each probability within ±0.025 of the exact one at 95 %
confidence (1.96 · √(¼ / 1,600) = 0.0245; the binomial standard error is largest at p = ½)."""
KILL_PROBABILITY_ERROR = 0.025
KILL_PROBABILITY_SEED = 20_251_204
"""Fixed seed of the estimate (not a lottery: activation draws only from the published seed)."""


def canonical_time(moment: datetime) -> str:
    """RFC 3339 UTC with a ``Z`` suffix: the only time spelling the seed ever hashes."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}"
    return text + "Z"


def seed_material(scope: str, reservation_uid: str, activation: datetime) -> str:
    """The exact string hashed into the seed, exposed so `kubectl runs explain` can print it."""
    return f"{scope}\n{reservation_uid}\n{canonical_time(activation)}"


def lottery_seed(scope: str, reservation_uid: str, activation: datetime) -> str:
    """Hex SHA-256 of (scope, reservation UID, activation time): fixed before any outcome."""
    material = seed_material(scope, reservation_uid, activation)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def draw_index(seed: str, step: int, stage: str, n: int) -> int:
    """Uniform index in ``[0, n)`` derived only from (seed, step, stage): replayable anywhere."""
    if n < 1:
        raise ValueError(f"cannot draw among {n} choices")
    limit = _SPACE - (_SPACE % n)
    attempt = 0
    while True:
        message = f"{seed}|{step}|{stage}" if attempt == 0 else f"{seed}|{step}|{stage}|{attempt}"
        value = int.from_bytes(hashlib.sha256(message.encode("utf-8")).digest(), "big")
        if value < limit:
            return value % n
        attempt += 1


@dataclass(frozen=True, slots=True)
class Token:
    """One thing the lottery can end: a malleable run's group above min, or a whole fixed run."""

    owner: str
    run: RunKey
    group: int | None
    """Group index for a malleable group token; ``None`` for a whole-run (AND bundle) token."""
    gpus: int
    """GPUs this token frees against the deficit (only GPUs in scope count)."""
    lease_names: tuple[str, ...]
    width: int | None = None
    """GPUs the token removes from its run's width (defaults to ``gpus``); malleable only."""
    run_slack: int | None = None
    """GPUs the run may lose before dropping below its minimum; ``None``: unconstrained."""

    @property
    def removes(self) -> int:
        """Width this token takes from its run when drawn."""
        return self.gpus if self.width is None else self.width


@dataclass(frozen=True, slots=True)
class Draw:
    """One published lottery outcome; equality is what replay verification compares."""

    step: int
    owner: str
    token: Token
    seed: str


def token_sort_key(token: Token) -> tuple[str, str, str, int, tuple[str, ...], int]:
    """Documented total order of tokens: owner, run namespace, run name, group (-1 = whole run)."""
    group = -1 if token.group is None else token.group
    return (token.owner, token.run[0], token.run[1], group, token.lease_names, token.gpus)


class _Pool:
    """Which tokens are still drawable given what was drawn so far (one lottery's state).

    Drawability of a token depends only on its own run, so a draw re-checks just that run's
    tokens; the per-owner lists stay in token order.
    """

    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = sorted(tokens, key=token_sort_key)
        self.taken: set[int] = set()
        self.drawn_width: dict[RunKey, int] = {}
        self.whole_cut: set[RunKey] = set()
        self.run_tokens: dict[RunKey, list[int]] = {}
        self.live: dict[str, list[int]] = {}
        for index, token in enumerate(self.tokens):
            self.run_tokens.setdefault(token.run, []).append(index)
            if self.drawable(index):
                self.live.setdefault(token.owner, []).append(index)

    def clone(self) -> _Pool:
        other = _Pool.__new__(_Pool)
        other.tokens = self.tokens
        other.run_tokens = self.run_tokens
        other.taken = set(self.taken)
        other.drawn_width = dict(self.drawn_width)
        other.whole_cut = set(self.whole_cut)
        other.live = {owner: list(indices) for owner, indices in self.live.items()}
        return other

    def drawable(self, index: int) -> bool:
        if index in self.taken:
            return False
        token = self.tokens[index]
        if token.run in self.whole_cut:
            return False
        drawn = self.drawn_width.get(token.run)
        if token.group is None:
            return drawn is None
        if token.run_slack is None:
            return True
        return (drawn or 0) + token.removes <= token.run_slack

    def candidates(self) -> dict[str, list[int]]:
        """Drawable token indices per owner, owners and tokens in their documented order."""
        return {owner: self.live[owner] for owner in sorted(self.live)}

    def take(self, index: int) -> Token:
        token = self.tokens[index]
        self.taken.add(index)
        self.drawn_width[token.run] = self.drawn_width.get(token.run, 0) + token.removes
        if token.group is None:
            self.whole_cut.add(token.run)
        for other in self.run_tokens[token.run]:
            owner = self.tokens[other].owner
            indices = self.live.get(owner)
            if indices is not None and other in indices and not self.drawable(other):
                indices.remove(other)
                if not indices:
                    del self.live[owner]
        return token


def run_lottery(seed: str, tokens: Sequence[Token], deficit: int) -> tuple[Draw, ...]:
    """Owner-first then token draws until the deficit is cleared or nothing is drawable."""
    pool = _Pool(tokens)
    draws: list[Draw] = []
    step = 0
    while deficit > 0:
        by_owner = pool.candidates()
        if not by_owner:
            break
        owners = list(by_owner)
        owner = owners[draw_index(seed, step, OWNER_STAGE, len(owners))]
        choices = by_owner[owner]
        token = pool.take(choices[draw_index(seed, step, TOKEN_STAGE, len(choices))])
        draws.append(Draw(step=step, owner=owner, token=token, seed=seed))
        deficit -= token.gpus
        step += 1
    return tuple(draws)


def replay(seed: str, tokens: Sequence[Token], deficit: int) -> tuple[Draw, ...]:
    """Re-run a published lottery; the very same function, so replay cannot drift."""
    return run_lottery(seed, tokens, deficit)


def verify(seed: str, tokens: Sequence[Token], deficit: int, recorded: Sequence[Draw]) -> bool:
    """True when the recorded draws are exactly what the seed produces (`kubectl runs explain`)."""
    return replay(seed, tokens, deficit) == tuple(recorded)


def kill_probability(
    tokens: Sequence[Token],
    deficit: int,
    *,
    max_states: int = KILL_PROBABILITY_MAX_STATES,
    samples: int = KILL_PROBABILITY_SAMPLES,
) -> Mapping[RunKey, float]:
    """Probability each run loses at least one token if a lottery for ``deficit`` ran now.

    Decided once, before any work: exact (a forward programme over the sets of drawn tokens)
    when :func:`state_bound` shows those sets cannot exceed ``max_states``; otherwise estimated
    from ``samples`` lotteries drawn with a fixed seed, each probability then within
    ``KILL_PROBABILITY_ERROR`` of the exact value at 95 % confidence. Deterministic either way,
    so an unchanged situation publishes unchanged odds.
    """
    runs = sorted({token.run for token in tokens})
    if deficit <= 0 or not tokens:
        return dict.fromkeys(runs, 0.0)
    if state_bound(tokens, deficit, max_states) <= max_states:
        hit = _exact_kill_probability(tokens, deficit)
    else:
        hit = _sampled_kill_probability(tokens, deficit, samples)
    return {run: hit.get(run, 0.0) for run in runs}


def state_bound(tokens: Sequence[Token], deficit: int, limit: int) -> int:
    """An upper bound on the lottery's distinct states (sets of drawn tokens), capped past
    ``limit``: a lottery stops once the deficit is cleared, so it draws at most ``k`` tokens,
    ``k`` the fewest of the smallest tokens that clear it, and there are at most
    Σ_{j≤k} C(n, j) such sets."""
    n = len(tokens)
    k, cleared = 0, 0
    for gpus in sorted(token.gpus for token in tokens):
        if cleared >= deficit:
            break
        cleared += gpus
        k += 1
    total, term = 1, 1
    for j in range(1, k + 1):
        term = term * (n - j + 1) // j
        total += term
        if total > limit:
            return total
    return total


def _exact_kill_probability(tokens: Sequence[Token], deficit: int) -> dict[RunKey, float]:
    """Forward dynamic programme over sets of drawn tokens (only called within its bound)."""
    start = _Pool(tokens)
    hit: dict[RunKey, float] = {}
    layer: dict[frozenset[int], tuple[float, _Pool, int]] = {frozenset(): (1.0, start, deficit)}
    while layer:
        next_layer: dict[frozenset[int], tuple[float, _Pool, int]] = {}
        for taken, (probability, pool, remaining) in layer.items():
            by_owner = pool.candidates() if remaining > 0 else {}
            if not by_owner:
                for run in {pool.tokens[i].run for i in taken}:
                    hit[run] = hit.get(run, 0.0) + probability
                continue
            owner_share = probability / len(by_owner)
            for choices in by_owner.values():
                share = owner_share / len(choices)
                for index in choices:
                    key = taken | {index}
                    known = next_layer.get(key)
                    if known is not None:
                        next_layer[key] = (known[0] + share, known[1], known[2])
                        continue
                    successor = pool.clone()
                    successor.take(index)
                    next_layer[key] = (share, successor, remaining - pool.tokens[index].gpus)
        layer = next_layer
    return hit


def _sampled_kill_probability(
    tokens: Sequence[Token], deficit: int, samples: int
) -> dict[RunKey, float]:
    """Share of ``samples`` lotteries (owner-first, then token, as drawn at activation) in
    which each run loses a token; the generator is seeded with a fixed constant."""
    rng = random.Random(KILL_PROBABILITY_SEED)
    runs = [token.run for token in tokens]
    if all(token.group is None for token in tokens) and len(set(runs)) == len(runs):
        return _sampled_whole_runs(tokens, deficit, samples, rng)
    base = _Pool(tokens)
    hits: dict[RunKey, int] = {}
    for _ in range(samples):
        pool = base.clone()
        remaining = deficit
        cut: set[RunKey] = set()
        while remaining > 0 and pool.live:
            owners = sorted(pool.live)
            choices = pool.live[owners[int(rng.random() * len(owners))]]
            token = pool.take(choices[int(rng.random() * len(choices))])
            cut.add(token.run)
            remaining -= token.gpus
        for run in cut:
            hits[run] = hits.get(run, 0) + 1
    return {run: count / samples for run, count in hits.items()}


def _sampled_whole_runs(
    tokens: Sequence[Token], deficit: int, samples: int, rng: random.Random
) -> dict[RunKey, float]:
    """The same estimate when every token is a whole run (one per run): a token stays drawable
    until drawn, so each draw is an owner uniform over all owners and a token uniform over its
    tokens; the owner is redrawn while it is exhausted and then its token while it was drawn
    (rejection keeps both choices exactly uniform over what is left): O(draws) per lottery,
    no copied state."""
    by_owner: dict[str, list[Token]] = {}
    for token in sorted(tokens, key=token_sort_key):
        by_owner.setdefault(token.owner, []).append(token)
    owners = [by_owner[o] for o in sorted(by_owner)]
    total = len(tokens)
    hits: dict[RunKey, int] = {}
    for _ in range(samples):
        remaining, drawn = deficit, 0
        taken: set[int] = set()
        used: dict[int, int] = {}
        while remaining > 0 and drawn < total:
            o = int(rng.random() * len(owners))
            pool = owners[o]
            if used.get(o, 0) == len(pool):
                continue
            t = int(rng.random() * len(pool))
            while (o << 32) | t in taken:  # the owner is chosen: redraw only its token
                t = int(rng.random() * len(pool))
            taken.add((o << 32) | t)
            used[o] = used.get(o, 0) + 1
            drawn += 1
            remaining -= pool[t].gpus
            hits[pool[t].run] = hits.get(pool[t].run, 0) + 1
    return {run: count / samples for run, count in hits.items()}
