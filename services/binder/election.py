"""Leader election over a ``coordination.k8s.io`` Lease, so only one binder replica writes.

The binder's capacity check is only sound if no other writer commits at the same time, so
replicas elect a leader: the holder renews the Lease every third of its duration; a candidate
takes it over once the holder has not renewed for a whole duration. Every write goes through
``resourceVersion`` preconditions, so two candidates can never both win a round. A leader that
cannot renew in time stops leading before anyone else may take over (it steps down when its own
last renewal is a duration old), and the process exits so it restarts as a candidate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes_asyncio.client import ApiClient

from shared.kube import writer
from shared.kube.client import KubeError, request
from shared.kube.resources import COORDINATION_LEASES

log = logging.getLogger(__name__)


def _micro(at: datetime) -> str:
    """MicroTime as the API expects it: RFC 3339 with microseconds and ``Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class LeaderElector:
    """Acquire and keep one coordination Lease; ``leading`` is set while this replica holds it."""

    def __init__(
        self,
        api: ApiClient,
        *,
        name: str,
        namespace: str,
        lease_seconds: float = 15.0,
        identity: str | None = None,
    ) -> None:
        self.api = api
        self.name = name
        self.namespace = namespace
        self.duration = timedelta(seconds=lease_seconds)
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        """Set when leadership, once held, could not be kept: the process should exit."""
        self._renewed: datetime | None = None

    @property
    def is_leader(self) -> bool:
        """Held, and renewed less than one duration ago (judged by our own clock)."""
        renewed = self._renewed
        return (
            self.leading.is_set()
            and renewed is not None
            and datetime.now(UTC) - renewed < self.duration
        )

    async def run(self) -> None:
        """Try to acquire, then renew, every third of the duration, until cancelled."""
        period = self.duration.total_seconds() / 3
        while True:
            try:
                held = await self._try_once()
            except KubeError as exc:
                log.warning("leader election round failed", extra={"error": str(exc)})
                held = False
            if held:
                if not self.leading.is_set():
                    log.info("became leader", extra={"identity": self.identity})
                self.leading.set()
            elif self.leading.is_set() and not self.is_leader:
                log.error("lost leadership", extra={"identity": self.identity})
                self.leading.clear()
                self.lost.set()
                return
            await asyncio.sleep(period)

    async def _try_once(self) -> bool:
        now = datetime.now(UTC)
        current = await writer.get(self.api, COORDINATION_LEASES, self.name, self.namespace)
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration.total_seconds()),
            "renewTime": _micro(now),
        }
        if current is None:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = 0
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            try:
                await request(self.api, "POST", COORDINATION_LEASES.path(self.namespace), body=body)
            except KubeError as exc:
                if exc.status == 409:
                    return False
                raise
            self._renewed = now
            return True
        old: dict[str, Any] = dict(current.get("spec") or {})
        holder = old.get("holderIdentity")
        renewed = _parse(old.get("renewTime")) or _parse(old.get("acquireTime"))
        seconds = old.get("leaseDurationSeconds") or int(self.duration.total_seconds())
        expired = renewed is None or now - renewed >= timedelta(seconds=float(seconds))
        if holder and holder != self.identity and not expired:
            return False
        if holder == self.identity:
            spec["acquireTime"] = old.get("acquireTime") or _micro(now)
            spec["leaseTransitions"] = old.get("leaseTransitions") or 0
        else:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
        body = {**current, "spec": spec}
        try:
            await request(
                self.api,
                "PUT",
                COORDINATION_LEASES.path(self.namespace, self.name),
                body=body,
            )
        except KubeError as exc:
            if exc.status == 409:  # someone else wrote first this round
                return False
            raise
        self._renewed = now
        return True

    async def release(self) -> None:
        """Give the Lease up on a clean stop so a standby takes over at once."""
        if not self.leading.is_set():
            return
        self.leading.clear()
        try:
            current = await writer.get(self.api, COORDINATION_LEASES, self.name, self.namespace)
            if current is None or (current.get("spec") or {}).get("holderIdentity") != (
                self.identity
            ):
                return
            spec = dict(current.get("spec") or {})
            spec["holderIdentity"] = None
            spec["renewTime"] = _micro(datetime(1970, 1, 1, tzinfo=UTC))
            await request(
                self.api,
                "PUT",
                COORDINATION_LEASES.path(self.namespace, self.name),
                body={**current, "spec": spec},
            )
        except KubeError as exc:
            log.warning("could not release leadership", extra={"error": str(exc)})
