"""The periodic sweep: the 24-hour rule, lapsed claims, jobs that never started.

One sweep runs at a time across every process sharing the database (`JobStore.exclusive`:
a PostgreSQL advisory lock, a file lock beside SQLite), so overlapping schedules (two
replicas, a Modal cron that overlaps itself) never do a step twice. Each step is
isolated: a step that fails is logged and reported, and the others still run, so one
bad record or a bucket that refuses credentials cannot stop lapsed claims from being
released. Deployments add their own steps (Modal re-spawns lost calls, sends due
webhooks) and schedule `run_forever` or call `run_once`. A function of the stores alone,
so `magicmix cleanup` runs it without loading a model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from magicmix.config import Settings
from magicmix.lifecycle import Lifecycle
from magicmix.outputs.store import OutputStore

log = logging.getLogger(__name__)

Step = tuple[str, Callable[[], Awaitable[object]]]
"""A named step of a sweep: an async callable; what it returns is reported by name."""


@dataclass
class SweepReport:
    ran: bool = True  # False: another process was sweeping
    removed: list[str] = field(default_factory=list)  # output names deleted
    expired: list[int] = field(default_factory=list)  # jobs whose outputs were deleted
    requeued: list[int] = field(default_factory=list)  # lapsed claims given back
    failed: list[int] = field(default_factory=list)  # jobs failed (lapsed too often, unstarted)
    extra: dict[str, object] = field(default_factory=dict)  # what deployment steps returned
    errors: dict[str, str] = field(default_factory=dict)  # step -> what went wrong


class Sweeper:
    """Runs the sweep's steps, each isolated, under the store's one-sweep-at-a-time lock."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        outputs: OutputStore,
        settings: Settings,
        *,
        steps: Sequence[Step] = (),
    ) -> None:
        self.lifecycle = lifecycle
        self.outputs = outputs
        self.settings = settings
        self._steps = list(steps)
        self.failures: dict[str, int] = {}  # step -> failures since start

    async def run_forever(self) -> None:
        """Sweep every `sweep_interval_s` for as long as the process runs."""
        while True:
            try:
                await self.run_once()
            except Exception:  # the lock itself failed (the database is away): next time
                log.exception("sweep could not run")
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def run_once(self) -> SweepReport:
        """One sweep, unless another process is sweeping right now."""
        exclusive = self.lifecycle.store.exclusive("sweep")
        if not await asyncio.to_thread(exclusive.__enter__):
            await asyncio.to_thread(exclusive.__exit__, None, None, None)
            log.info("another process is sweeping; skipped")
            return SweepReport(ran=False)
        report = SweepReport()
        try:
            for name, step in self._core(report) + self._steps:
                try:
                    outcome = await step()
                except Exception as err:  # isolated: the other steps still run
                    self.failures[name] = self.failures.get(name, 0) + 1
                    report.errors[name] = type(err).__name__
                    log.exception(
                        "sweep step %r failed (%d times so far)", name, self.failures[name]
                    )
                    continue
                if outcome is not None:  # the core steps fill the report themselves
                    report.extra[name] = outcome
        finally:
            await asyncio.to_thread(exclusive.__exit__, None, None, None)
        if report.removed or report.expired or report.requeued or report.failed or report.errors:
            log.info(
                "sweep removed %d outputs, expired %d jobs, requeued %d, failed %d; errors: %s",
                len(report.removed),
                len(report.expired),
                len(report.requeued),
                len(report.failed),
                report.errors or "none",
            )
        return report

    def _core(self, report: SweepReport) -> list[Step]:
        settings, lifecycle = self.settings, self.lifecycle
        cutoff = datetime.now(UTC) - timedelta(hours=settings.retention_hours)

        async def outputs() -> None:
            report.removed = await asyncio.to_thread(self.outputs.delete_older_than, cutoff)

        async def records() -> None:
            report.expired = await asyncio.to_thread(lifecycle.expire, cutoff.timestamp())

        async def leases() -> None:
            requeued, failed = await asyncio.to_thread(lifecycle.release_lapsed)
            report.requeued = [job.id for job in requeued]
            report.failed += [job.id for job in failed]

        async def unstarted() -> None:
            failed = await asyncio.to_thread(lifecycle.fail_unstarted, settings.stale_queued_s)
            report.failed += [job.id for job in failed]

        async def idempotency() -> None:
            await asyncio.to_thread(lifecycle.forget_idempotent)

        return [
            ("leases", leases),
            ("outputs", outputs),
            ("expire", records),
            ("unstarted", unstarted),
            ("idempotency", idempotency),
        ]
