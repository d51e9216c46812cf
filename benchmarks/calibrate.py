"""Is the planner right? Its prediction for a burst next to the same burst on the real service.

The measuring half lives in tests/test_planner.py (it runs the local service with the
test fixtures: uvicorn on loopback, SQLite, the tiny model); this half turns what was
measured into a prediction and a comparison:

1. profile the service's own engine at the burst's request size
   (`benchmarks.measure.time_batches`, `time_host_work`) into a `GpuProfile`;
2. burst N jobs at the service (sync_wait_s=0, so each POST answers `processing`), poll
   `fetch` until each is `success`; a job's latency is its POST being sent to its success
   being seen, the drain time is the first send to the last success;
3. simulate one always-up container (`min_containers=1`, cold start 0) batching like the
   local worker (`linger="local"`), with the service's batch size and wait, fed the
   measured send times; compare drain and p95.

    print(compare_burst(profile, measurement, batch_size=4, batch_wait_s=0.02).render())
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from magicmix.planner import Arrivals, Capacity, GpuProfile, simulate
from magicmix.planner.report import percentile


@dataclass
class BurstMeasurement:
    """One real burst, times in seconds from the first POST being sent."""

    sent_at: list[float]
    seen_done_at: list[float]  # when a fetch poll first saw `success`
    server_done_at: list[float] | None = None  # the job records' finished_at
    queued_at: list[float] | None = None  # the job records' created_at: entering the queue
    poll_interval_s: float = 0.0  # mean time between two polls of the same job
    service_batches: list[tuple[int, float]] | None = None  # (size, engine s) the service ran

    @property
    def latencies(self) -> list[float]:
        return [done - sent for sent, done in zip(self.sent_at, self.seen_done_at, strict=True)]

    @property
    def drain_s(self) -> float:
        return max(self.seen_done_at)

    @property
    def server_latencies(self) -> list[float] | None:
        if self.server_done_at is None:
            return None
        return [d - s for s, d in zip(self.sent_at, self.server_done_at, strict=True)]


@dataclass
class Calibration:
    jobs: int
    profile: str
    batch_size: int
    batch_wait_s: float
    per_batch_s: dict[int, float]
    per_image_overhead_s: float
    measured_drain_s: float
    measured_p50_s: float
    measured_p95_s: float
    server_drain_s: float | None
    server_p95_s: float | None
    predicted_drain_s: float
    predicted_p50_s: float
    predicted_p95_s: float
    predicted_batches: int
    burst_at_zero_drain_s: float  # the same jobs as one burst at t=0 (`magicmix plan --burst`)
    poll_interval_s: float
    service_batches: list[tuple[int, float]] | None = None
    queued_drain_s: float | None = None  # arrivals = when each job entered the queue
    queued_p95_s: float | None = None
    # the same run with the engine seconds the service itself recorded per batch: what is
    # left is the queueing model's own error, without the profile's timing noise
    service_timed_drain_s: float | None = None
    service_timed_p95_s: float | None = None

    @staticmethod
    def error(predicted: float, measured: float) -> float:
        """Relative error of the prediction, (predicted - measured) / measured."""
        return (predicted - measured) / measured

    @property
    def drain_error(self) -> float:
        return self.error(self.predicted_drain_s, self.measured_drain_s)

    @property
    def p95_error(self) -> float:
        return self.error(self.predicted_p95_s, self.measured_p95_s)

    def render(self) -> str:
        per_batch = ", ".join(f"b{k} {v:.3f}s" for k, v in self.per_batch_s.items())
        rows = [
            ("drain (first POST to last success)", self.measured_drain_s, self.predicted_drain_s),
            ("latency p50", self.measured_p50_s, self.predicted_p50_s),
            ("latency p95", self.measured_p95_s, self.predicted_p95_s),
        ]
        lines = [
            f"planner vs the real local service: {self.jobs} jobs at once, batch"
            f" {self.batch_size}, wait {self.batch_wait_s * 1000:.0f} ms, one worker",
            f"profile {self.profile}: {per_batch}, host work {self.per_image_overhead_s * 1000:.1f}"
            f" ms/image; {self.predicted_batches} batches predicted",
            f"{'':36s} {'measured':>9s} {'predicted':>9s} {'error':>7s}",
        ]
        for name, measured, predicted in rows:
            lines.append(
                f"{name:36s} {measured:8.2f}s {predicted:8.2f}s"
                f" {self.error(predicted, measured):+7.1%}"
            )
        if self.server_drain_s is not None and self.server_p95_s is not None:
            lines.append(
                f"(server-side finish times, no poll delay: drain {self.server_drain_s:.2f}s,"
                f" p95 {self.server_p95_s:.2f}s; polls every ~{self.poll_interval_s:.2f}s)"
            )
        lines.append(
            f"(as one burst at t=0 instead of the measured send times: drain"
            f" {self.burst_at_zero_drain_s:.2f}s)"
        )
        if self.queued_drain_s is not None and self.queued_p95_s is not None:
            drain_err = self.error(self.queued_drain_s, self.measured_drain_s)
            p95_err = self.error(self.queued_p95_s, self.measured_p95_s)
            lines.append(
                f"(arrivals = when each job entered the queue, after the web tier: drain"
                f" {self.queued_drain_s:.2f}s ({drain_err:+.1%}),"
                f" p95 {self.queued_p95_s:.2f}s ({p95_err:+.1%}))"
            )
        if self.service_batches:
            sizes = sorted({n for n, _ in self.service_batches})
            parts = []
            for n in sizes:
                seconds = [s for m, s in self.service_batches if m == n]
                parts.append(
                    f"{len(seconds)} x b{n} at {statistics.median(seconds):.3f}s"
                    f" (profile {self.per_batch_s.get(n, math.nan):.3f}s)"
                )
            lines.append("batches the service ran, engine seconds (median): " + ", ".join(parts))
        if self.service_timed_drain_s is not None and self.service_timed_p95_s is not None:
            drain_err = self.error(self.service_timed_drain_s, self.measured_drain_s)
            p95_err = self.error(self.service_timed_p95_s, self.measured_p95_s)
            lines.append(
                f"(with those engine seconds instead of the profile's: drain"
                f" {self.service_timed_drain_s:.2f}s ({drain_err:+.1%}),"
                f" p95 {self.service_timed_p95_s:.2f}s ({p95_err:+.1%}))"
            )
        return "\n".join(lines)


def local_capacity(*, batch_size: int, batch_wait_s: float, jobs: int) -> Capacity:
    """The local service as the planner sees it: one worker thread, always up, no limits hit."""
    return Capacity(
        max_containers=1,
        min_containers=1,
        batch_size=batch_size,
        batch_wait_s=batch_wait_s,
        scaledown_window_s=3600.0,
        max_queue=max(jobs, 1),
        max_queued_per_key=max(jobs, 1),
        linger="local",
    )


def compare_burst(
    profile: GpuProfile,
    measurement: BurstMeasurement,
    *,
    batch_size: int,
    batch_wait_s: float,
) -> Calibration:
    """Simulate the measured burst on `profile` (cold start 0) and line the figures up."""
    jobs = len(measurement.sent_at)
    warm = profile.with_cold_start(0.0)
    capacity = local_capacity(batch_size=batch_size, batch_wait_s=batch_wait_s, jobs=jobs)
    result = simulate(warm, capacity, Arrivals.from_times(measurement.sent_at))
    predicted = [r.latency for r in result.served]
    burst = simulate(warm, capacity, Arrivals.burst(jobs))
    server = measurement.server_latencies
    queued_drain = queued_p95 = None
    queued_at = measurement.queued_at
    if queued_at is not None:
        # latency still counts from each POST being sent; request k of the run is the k-th
        # job to enter the queue (`Arrivals.from_times` sorts)
        order = sorted(range(jobs), key=lambda i: queued_at[i])
        queued = simulate(warm, capacity, Arrivals.from_times(queued_at))
        done = {order[k]: r.done_at or 0.0 for k, r in enumerate(queued.requests)}
        queued_drain = max(done.values())
        queued_p95 = percentile([done[i] - measurement.sent_at[i] for i in range(jobs)], 95)
    timed_drain = timed_p95 = None
    if measurement.service_batches:
        sizes = sorted({n for n, _ in measurement.service_batches})
        medians = {
            n: statistics.median(s for m, s in measurement.service_batches if m == n) for n in sizes
        }
        timed = warm.model_copy(update={"per_batch_s": {**warm.per_batch_s, **medians}})
        timed_run = simulate(timed, capacity, Arrivals.from_times(measurement.sent_at))
        timed_drain = max(r.done_at or 0.0 for r in timed_run.served)
        timed_p95 = percentile([r.latency for r in timed_run.served], 95)
    return Calibration(
        jobs=jobs,
        profile=profile.name,
        batch_size=batch_size,
        batch_wait_s=batch_wait_s,
        per_batch_s={n: profile.engine_seconds(n) for n in range(1, batch_size + 1)},
        per_image_overhead_s=profile.per_image_overhead_s,
        measured_drain_s=measurement.drain_s,
        measured_p50_s=percentile(measurement.latencies, 50),
        measured_p95_s=percentile(measurement.latencies, 95),
        server_drain_s=max(measurement.server_done_at) if measurement.server_done_at else None,
        server_p95_s=percentile(server, 95) if server else None,
        predicted_drain_s=max(r.done_at or 0.0 for r in result.served),
        predicted_p50_s=percentile(predicted, 50),
        predicted_p95_s=percentile(predicted, 95),
        predicted_batches=len(result.batches),
        burst_at_zero_drain_s=max(r.done_at or 0.0 for r in burst.served),
        poll_interval_s=measurement.poll_interval_s,
        service_batches=measurement.service_batches,
        queued_drain_s=queued_drain,
        queued_p95_s=queued_p95,
        service_timed_drain_s=timed_drain,
        service_timed_p95_s=timed_p95,
    )


def profile_from_timings(
    name: str,
    device: str,
    per_batch_s: dict[int, float],
    per_image_overhead_s: float,
    *,
    source: str,
    notes: Sequence[str] = (),
) -> GpuProfile:
    """A warm-only profile (cold start 0) from timings taken in this process."""
    from datetime import date

    return GpuProfile(
        name=name,
        device=device,
        measured_on=date.today(),
        source=source,
        per_batch_s=per_batch_s,
        per_image_overhead_s=per_image_overhead_s,
        cold_start_s=0.0,
        notes=list(notes),
    )
