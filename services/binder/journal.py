"""The binder's commit journal: a commit being applied survives a crash of the binder.

A commit writes many objects one after the other (lease ends, Leases, Pods). A binder killed, or
an API server failing, in the middle leaves part of a gang written: Leases that hold GPUs without
their pods, or a swap's ends without its starts. Commits are idempotent, so re-applying the same
request completes such a commit, but the proposer may never re-send it (it timed out, saw the
Leases and moved on). So the binder keeps the request itself:

- just before it writes anything for a commit, it stores the request in the JetStream stream
  ``JOBTREE_BINDER_JOURNAL`` (file storage, one subject per commit key);
- once the commit is applied, it purges that subject;
- when it starts serving (after its caches are synced, and after winning the election) and after
  an apply that failed part-way, it re-applies every request still in the journal, oldest first.
  A re-applied commit is re-checked like any other — fit and justification, so an entry written
  into the journal by anyone else gains nothing — with its Leases' start times measured against
  the instant the NATS server stored the entry; one that is rejected now (the Run is gone, for
  instance) is dropped from the journal with a log line.

Losing the journal (NATS down) refuses new commits (``JournalUnavailable``) rather than writing
one that could not be completed after a crash.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from typing import Any

import msgspec
import nats.js.errors
from nats.js import api as js_api

from shared.bus.messages import CommitRequest, decode, encode
from shared.bus.subjects import JOURNAL_PREFIX, JOURNAL_STREAM

log = logging.getLogger(__name__)

STREAM = JOURNAL_STREAM.name
SUBJECT_PREFIX = JOURNAL_PREFIX


def entry_subject(commit_key: str) -> str:
    """The journal subject of one commit (commit keys may hold ``:`` and ``/``: hash them)."""
    return f"{SUBJECT_PREFIX}.{hashlib.sha256(commit_key.encode()).hexdigest()}"


class Journal:
    """Write-ahead record of the commits the binder is applying (JetStream, file storage)."""

    def __init__(self, nc: Any) -> None:
        self._js = nc.jetstream()

    async def open(self) -> None:
        """Create the journal stream, or update it to this configuration (idempotent)."""
        cfg = js_api.StreamConfig(
            name=STREAM,
            description="Commits the binder is applying; purged once applied (see journal.py).",
            subjects=list(JOURNAL_STREAM.subjects),
            max_age=JOURNAL_STREAM.max_age_seconds,  # 0: kept until applied and purged
            max_bytes=JOURNAL_STREAM.max_bytes,
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            max_msgs_per_subject=1,
            discard=js_api.DiscardPolicy.OLD,
        )
        try:
            await self._js.add_stream(cfg)
        except nats.js.errors.BadRequestError:  # exists with another config
            await self._js.update_stream(cfg)

    async def record(self, request: CommitRequest) -> None:
        """Store the request before anything of it is written (waits for the store's ack)."""
        await self._js.publish(entry_subject(request.key), encode(request), stream=STREAM)

    async def done(self, commit_key: str) -> None:
        """Forget an applied commit."""
        await self._js.purge_stream(STREAM, subject=entry_subject(commit_key))

    async def pending(self) -> list[tuple[CommitRequest, datetime | None]]:
        """Every commit still in the journal, oldest first, with when the NATS server stored it
        (the binder measures the Leases' start times against that); undecodable entries are
        dropped."""
        out: list[tuple[CommitRequest, datetime | None]] = []
        seq = 1
        while True:
            try:
                msg = await self._js.get_msg(
                    STREAM, seq=seq, subject=f"{SUBJECT_PREFIX}.*", next=True
                )
            except nats.js.errors.NotFoundError:
                return out
            seq = int(msg.seq) + 1
            try:
                out.append((decode(msg.data or b"", CommitRequest), msg.time))
            except msgspec.DecodeError as exc:
                log.error("journal entry dropped: undecodable", extra={"error": str(exc)})
                await self._js.purge_stream(STREAM, subject=msg.subject)
