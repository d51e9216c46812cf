"""Load on loopback: many clients, zero errors other than deliberate 429s, bounded memory.

Real uvicorn, real SQLite, the tiny model at 256x256 with 2 steps (one UNet step per job,
so the test measures the service, not the model). Client threads send `magic_mix`
requests; a 429 is retried after a short pause (a deliberate answer of a full queue, not an
error); anything else but a 200 `success` fails the test. Every accepted job must end
`success` with a downloadable PNG: nothing lost. The service runs in this process, so a
sampler thread reads this process's RSS over time.

- default suite: 32 requests from 8 clients (a queue big enough: no 429 expected);
- `slow`: 300 requests from 20 clients against a queue of 12 (429s forced), and RSS
  growth over 500 jobs kept under `RSS_GROWTH_BOUND_MB` after a warm-up.

Each run prints its figures (p50/p99 latency, throughput, 429s, RSS start/peak/end); run
with `-s` to see them.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.http_fixtures import LoopbackServer
from tests.service_fixtures import RunningService, serve, service_settings

FAST = {"steps": 2, "width": 256, "height": 256}
RSS_GROWTH_BOUND_MB = 150.0  # after warm-up; the tiny model's batches allocate ~10 MB each


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextmanager
def rss_sampler(every_s: float = 0.25) -> Iterator[list[tuple[float, float]]]:
    """(seconds since start, RSS MB) samples, taken by a thread while the block runs."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - started, rss_mb()))
            stop.wait(every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join(5)
        samples.append((time.monotonic() - started, rss_mb()))


@dataclass
class LoadReport:
    latencies_s: list[float] = field(default_factory=list)
    throttled: int = 0
    errors: list[str] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self, samples: list[tuple[float, float]]) -> str:
        rss = [mb for _, mb in samples]
        return (
            f"{len(self.latencies_s)} ok, {self.throttled} x 429, {len(self.errors)} errors in"
            f" {self.wall_s:.1f} s ({len(self.latencies_s) / self.wall_s:.1f} jobs/s);"
            f" latency p50 {self.percentile(0.5):.2f} s, p99 {self.percentile(0.99):.2f} s,"
            f" mean {statistics.fmean(self.latencies_s):.2f} s;"
            f" RSS start {rss[0]:.0f} MB, peak {max(rss):.0f} MB, end {rss[-1]:.0f} MB"
        )


def run_load(app: RunningService, image: str, *, requests: int, clients: int) -> LoadReport:
    """`requests` mixes from `clients` threads; each retries its request after a 429."""
    report = LoadReport()
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                seed = next(counter, None)
            if seed is None:
                return
            while True:
                started = time.monotonic()
                reply = app.mix(image=image, seed=seed, prompt=f"load {seed % 7}", **FAST)
                took = time.monotonic() - started
                with lock:
                    if reply.status_code == 429:
                        report.throttled += 1
                    elif reply.status_code == 200 and reply.json()["status"] == "success":
                        report.latencies_s.append(took)
                        report.job_ids.append(reply.json()["id"])
                        report.outputs.append(reply.json()["output"][0])
                    else:
                        report.errors.append(f"{reply.status_code} {reply.text[:200]}")
                if reply.status_code != 429:
                    break
                time.sleep(0.2)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.wall_s = time.monotonic() - started
    return report


def assert_nothing_lost(app: RunningService, report: LoadReport, requests: int) -> None:
    assert not report.errors, report.errors[:5]
    assert len(report.job_ids) == requests == len(set(report.job_ids))
    assert app.service.jobs.queue_length() == 0
    for url in report.outputs[:: max(1, len(report.outputs) // 20)]:
        assert app.download(url).startswith(b"\x89PNG")


def test_load_small(tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer) -> None:
    settings = service_settings(tmp_path, tiny_model_dir, batch_size=8, sync_wait_s=60)
    with serve(settings) as app:
        with rss_sampler() as samples:
            report = run_load(app, image_host.url("/layout.png"), requests=32, clients=8)
        print(f"\nload (32 requests, 8 clients): {report.summary(samples)}")
        assert_nothing_lost(app, report, 32)
    assert report.throttled == 0  # the queue (64) is larger than the clients: no 429 due


@pytest.mark.slow
def test_load_300_requests_20_clients_with_forced_429s(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    settings = service_settings(
        tmp_path, tiny_model_dir, batch_size=8, sync_wait_s=120, max_queue=12
    )
    with serve(settings) as app:
        with rss_sampler() as samples:
            report = run_load(app, image_host.url("/layout.png"), requests=300, clients=20)
        print(f"\nload (300 requests, 20 clients, queue 12): {report.summary(samples)}")
        assert_nothing_lost(app, report, 300)
    assert report.throttled > 0  # the small queue did push back


@pytest.mark.slow
def test_rss_growth_over_500_jobs_is_bounded(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    settings = service_settings(tmp_path, tiny_model_dir, batch_size=8, sync_wait_s=120)
    with serve(settings) as app:
        image = image_host.url("/layout.png")
        run_load(app, image, requests=40, clients=8)  # warm-up: allocator pools, caches
        with rss_sampler(every_s=1.0) as samples:
            report = run_load(app, image, requests=500, clients=8)
        assert_nothing_lost(app, report, 500)
    growth = samples[-1][1] - samples[0][1]
    print(f"\n500 jobs after warm-up: {report.summary(samples)}; growth {growth:+.0f} MB")
    tenths = [f"{t:.0f}s:{mb:.0f}" for t, mb in samples[:: max(1, len(samples) // 10)]]
    print("RSS over time (s:MB): " + " ".join(tenths))
    assert growth < RSS_GROWTH_BOUND_MB
