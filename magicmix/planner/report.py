"""What a simulation means for the people paying for it: drain time, latency, refusals, cost."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from magicmix.planner.sim import SimResult

TIMELINE_ROWS = 12


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def live_at(timeline: Sequence[tuple[float, int]], t: float) -> int:
    """Live containers just after time t."""
    live = 0
    for at, count in timeline:
        if at > t:
            break
        live = count
    return live


def time_weighted_mean(timeline: Sequence[tuple[float, int]], start: float, end: float) -> float:
    """Mean live containers over [start, end]."""
    if end <= start:
        return float(live_at(timeline, start))
    total = 0.0
    points = [*timeline, (math.inf, timeline[-1][1] if timeline else 0)]
    for (at, count), (next_at, _) in itertools.pairwise(points):
        lo, hi = max(at, start), min(next_at, end)
        if hi > lo:
            total += count * (hi - lo)
    return total / (end - start)


def peak_between(timeline: Sequence[tuple[float, int]], start: float, end: float) -> int:
    peak = live_at(timeline, start)
    for at, count in timeline:
        if start < at < end:
            peak = max(peak, count)
    return peak


@dataclass
class TimelineRow:
    start_s: float
    end_s: float
    peak: int
    mean: float


@dataclass
class Summary:
    """The figures `magicmix plan` prints (and `--json` writes)."""

    arrivals: str
    profile: str
    device: str
    capacity: dict[str, Any]
    cold_start_s: float
    requests: int
    served: int
    refused: int
    rejections: int  # 429 replies, retries included
    drain_s: float | None  # last completion
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    latency_max_s: float | None
    batches: int
    mean_batch_size: float | None
    containers_max: int
    containers_mean: float  # time-weighted over [0, drain]
    containers_started: int
    last_stop_s: float  # when the last container stopped (end of billing)
    gpu_seconds: float  # billed: cold starts + batches + idle windows
    busy_gpu_seconds: float  # inside batches only
    price_per_gpu_hour: float | None
    cost: float | None
    cost_per_1000_images: float | None
    timeline: list[TimelineRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(result: SimResult, *, price_per_gpu_hour: float | None = None) -> Summary:
    """Reduce a run to its summary; `price_per_gpu_hour` falls back to the profile's."""
    price = (
        price_per_gpu_hour
        if price_per_gpu_hour is not None
        else (result.profile.price_per_gpu_hour)
    )
    served = result.served
    latencies = [r.latency for r in served]
    drain = max((r.done_at for r in served if r.done_at is not None), default=None)
    stops = [c.stopped_at for c in result.containers]
    last_stop = max((result.horizon if s is None else s for s in stops), default=0.0)
    gpu_s = result.gpu_seconds()
    cost = gpu_s / 3600 * price if price is not None else None
    sizes = [b.size for b in result.batches]
    return Summary(
        arrivals=result.arrivals.label,
        profile=result.profile.name,
        device=result.profile.device,
        capacity=dataclasses.asdict(result.capacity),
        cold_start_s=result.profile.cold_start_s,
        requests=len(result.requests),
        served=len(served),
        refused=len(result.refused),
        rejections=result.rejections,
        drain_s=drain,
        latency_p50_s=percentile(latencies, 50) if latencies else None,
        latency_p95_s=percentile(latencies, 95) if latencies else None,
        latency_p99_s=percentile(latencies, 99) if latencies else None,
        latency_max_s=max(latencies) if latencies else None,
        batches=len(sizes),
        mean_batch_size=sum(sizes) / len(sizes) if sizes else None,
        containers_max=max((count for _, count in result.timeline), default=0),
        containers_mean=time_weighted_mean(result.timeline, 0.0, drain or 0.0),
        containers_started=len(result.containers),
        last_stop_s=last_stop,
        gpu_seconds=gpu_s,
        busy_gpu_seconds=sum(b.seconds for b in result.batches),
        price_per_gpu_hour=price,
        cost=cost,
        cost_per_1000_images=cost / len(served) * 1000 if cost is not None and served else None,
        timeline=timeline_rows(result.timeline, last_stop),
    )


def timeline_rows(
    timeline: Sequence[tuple[float, int]], end: float, rows: int = TIMELINE_ROWS
) -> list[TimelineRow]:
    """Containers over [0, end] in `rows` equal slices: peak and time-weighted mean."""
    if end <= 0:
        return []
    step = end / rows
    out = []
    for i in range(rows):
        lo, hi = i * step, (i + 1) * step
        peak, mean = peak_between(timeline, lo, hi), time_weighted_mean(timeline, lo, hi)
        out.append(TimelineRow(lo, hi, peak, mean))
    return out


def _s(value: float | None, unit: str = "s") -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "s" and value >= 120:
        return f"{value:.0f}s ({value / 60:.1f} min)"
    return f"{value:.2f}{unit}" if value < 100 else f"{value:.0f}{unit}"


def render_text(summary: Summary) -> str:
    """The human-readable report."""
    cap = summary.capacity
    lines = [
        f"plan: {summary.arrivals}",
        f"profile: {summary.profile} on {summary.device}, cold start {summary.cold_start_s:.1f}s",
        (
            f"capacity: max {cap['max_containers']} GPUs (min {cap['min_containers']}),"
            f" batch {cap['batch_size']}, wait {cap['batch_wait_s'] * 1000:.0f} ms,"
            f" idle {cap['scaledown_window_s']:g}s, max_queue {cap['max_queue']},"
            f" per key {cap['max_queued_per_key']}"
        ),
        "",
        f"requests          {summary.requests}",
        f"served            {summary.served}",
        f"refused (429)     {summary.refused}"
        + (
            f"  ({summary.rejections} 429 replies with retries)"
            if summary.rejections != summary.refused
            else ""
        ),
        f"time to drain     {_s(summary.drain_s)}",
        (
            f"latency           p50 {_s(summary.latency_p50_s)}  p95 {_s(summary.latency_p95_s)}"
            f"  p99 {_s(summary.latency_p99_s)}  max {_s(summary.latency_max_s)}"
        ),
        (
            f"batches           {summary.batches}, mean size "
            + (f"{summary.mean_batch_size:.2f}" if summary.mean_batch_size else "-")
        ),
        (
            f"containers        max {summary.containers_max}, mean {summary.containers_mean:.2f}"
            f" while draining, {summary.containers_started} started,"
            f" last stops at {_s(summary.last_stop_s)}"
        ),
        (
            f"GPU-seconds       {summary.gpu_seconds:.1f} billed"
            f" ({summary.busy_gpu_seconds:.1f} in batches incl. host work,"
            f" {summary.gpu_seconds - summary.busy_gpu_seconds:.1f} cold start + idle)"
        ),
    ]
    if summary.cost is not None and summary.price_per_gpu_hour is not None:
        per_k = summary.cost_per_1000_images
        lines.append(
            f"cost              ${summary.cost:.4f} at ${summary.price_per_gpu_hour:g}/GPU-h"
            + (f", ${per_k:.3f} per 1000 images" if per_k is not None else "")
        )
    else:
        lines.append("cost              - (no --price and none in the profile)")
    if summary.timeline:
        lines += ["", "containers over time (peak / mean in each slice)"]
        for row in summary.timeline:
            bar = "#" * row.peak
            lines.append(
                f"  {row.start_s:8.1f}s - {row.end_s:8.1f}s  {row.peak:3d} / {row.mean:6.2f}  {bar}"
            )
    return "\n".join(lines)
