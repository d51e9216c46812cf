"""`magicmix plan`: the simulator's invariants, the profiles, the command, and a check of
its predictions against the real local service (slow suite).

The fast tests run the pure-Python simulator only (no torch, each well under a second).
The slow test bursts 48 jobs at the real service on loopback with the tiny model and
compares the measured drain time and p95 latency with the planner's; run it with
`pytest -m slow -k planner`, or print the comparison with `python -m tests.test_planner`.
"""

from __future__ import annotations

import ast
import base64
import io
import itertools
import json
import math
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from benchmarks.calibrate import BurstMeasurement, Calibration, compare_burst
from magicmix.cli.plan import plan_command
from magicmix.config import Settings
from magicmix.families import SD1
from magicmix.planner import Arrivals, Capacity, GpuProfile, default_profile_path, simulate
from magicmix.planner.report import percentile, summarize, time_weighted_mean
from magicmix.planner.sim import SimResult

ROOT = Path(__file__).resolve().parents[1]
COMPILED_PROFILE = ROOT / "benchmarks" / "results" / "profile-h200-2026-11-27-compiled.json"
UNLIMITED = 10**9


def profile(cold_start_s: float = 10.0, overhead: float = 0.0, **fields: Any) -> GpuProfile:
    """A small made-up profile: 0.5 s at b1, 1.0 s at b4, 1.8 s at b8."""
    values: dict[str, Any] = {
        "name": "test",
        "device": "test",
        "measured_on": date(2026, 11, 27),
        "source": "tests",
        "per_batch_s": {1: 0.5, 4: 1.0, 8: 1.8},
        "cold_start_s": cold_start_s,
        "per_image_overhead_s": overhead,
    }
    return GpuProfile(**{**values, **fields})


def drain(result: SimResult) -> float:
    """The last completion (every test load serves at least one request)."""
    return max(r.done_at for r in result.served if r.done_at is not None)


def run(
    prof: GpuProfile | None = None, arrivals: Arrivals | None = None, **capacity: Any
) -> SimResult:
    return simulate(prof or profile(), Capacity(**capacity), arrivals or Arrivals.burst(10))


# -- profiles -----------------------------------------------------------------------------


def test_batch_seconds_interpolates_linearly_and_extrapolates_per_image() -> None:
    p = profile()
    assert p.batch_seconds(1) == 0.5 and p.batch_seconds(8) == 1.8
    assert p.batch_seconds(2) == pytest.approx(0.5 + 0.5 / 3)  # between 1 and 4
    assert p.batch_seconds(6) == pytest.approx(1.0 + 0.8 / 2)  # between 4 and 8
    assert p.batch_seconds(16) == pytest.approx(1.8 / 8 * 16)  # the largest's per-image time
    only_large = profile(per_batch_s={4: 1.0, 8: 1.8})
    assert only_large.batch_seconds(1) == 1.0  # below the smallest: its time (upper bound)
    sizes = range(1, 33)
    assert all(p.batch_seconds(a) <= p.batch_seconds(a + 1) for a in sizes)


def test_buckets_and_host_work_add_to_a_batch() -> None:
    padded = profile(batch_buckets=[1, 2, 4, 8])
    assert padded.batch_seconds(3) == padded.batch_seconds(4) == 1.0
    assert padded.batch_seconds(5) == 1.8
    with_host = profile(overhead=0.1)
    assert with_host.engine_seconds(4) == 1.0
    assert with_host.batch_seconds(4) == pytest.approx(1.4)


def test_profile_validation_and_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_batch_s"):
        profile(per_batch_s={})
    with pytest.raises(ValueError, match="seconds > 0"):
        profile(per_batch_s={1: 0.0})
    with pytest.raises(ValueError, match="sum to"):
        profile(cold_start_s=5.0, cold_start_parts={"boot": 1.0, "load": 1.0})
    with pytest.raises(ValueError, match="unknown parts"):
        profile(cold_start_s=2.0, cold_start_parts={"boot": 2.0}, cold_start_measured=["x"])
    p = profile(cold_start_s=2.0, cold_start_parts={"boot": 1.5, "load": 0.5})
    path = p.save(tmp_path / "sub" / "p.json")
    assert json.loads(path.read_text())["per_batch_s"] == {"1": 0.5, "4": 1.0, "8": 1.8}
    assert GpuProfile.load(path) == p
    assert p.with_cold_start(0.0).cold_start_s == 0.0


def test_shipped_h200_profiles_hold_the_measured_figures() -> None:
    default = GpuProfile.load(default_profile_path())
    assert default_profile_path().name == "profile-h200-2026-11-27.json"
    # benchmarks/results/gpu-h200-2026-11-27.json, config fp16: medians of runs_s
    assert default.per_batch_s == {1: 0.4953, 4: 0.9761, 8: 1.8502}
    assert default.engine_seconds(8) / 8 == pytest.approx(0.231, abs=0.001)
    assert default.per_image_overhead_s == 0.10  # host work per image, from the CPU bench
    assert set(default.cold_start_measured) <= set(default.cold_start_parts)
    assert any("ASSUMED" in note for note in default.notes)
    compiled = GpuProfile.load(COMPILED_PROFILE)
    assert compiled.per_batch_s[1] == pytest.approx(0.239, abs=0.001)
    assert compiled.batch_buckets == [1, 2, 4, 8, 16]
    assert compiled.cold_start_s > 200  # torch.compile at every container start


# -- the simulator's invariants ---------------------------------------------------------


def configs(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Assorted capacities and loads, reproducible."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append(
            {
                "batch_size": rng.choice([1, 2, 3, 4, 8]),
                "batch_wait_s": rng.choice([0.0, 0.05, 0.15, 0.5]),
                "scaledown_window_s": rng.choice([0.0, 2.0, 60.0, 120.0]),
                "max_queue": rng.choice([UNLIMITED, 64, 150]),
                "max_queued_per_key": rng.choice([UNLIMITED, 32]),
                "linger": rng.choice(["modal", "local"]),
                "cold": rng.choice([0.0, 2.0, 10.5, 60.0]),
                "n": rng.randint(1, 250),
                "keys": rng.choice([1, 3, 10]),
                "retries": rng.choice([0, 0, 2]),
            }
        )
    return out


@pytest.mark.parametrize("config", configs(12), ids=lambda c: f"b{c['batch_size']}-n{c['n']}")
def test_every_request_is_served_or_refused_exactly_once(config: dict[str, Any]) -> None:
    c = dict(config)
    prof = profile(cold_start_s=c.pop("cold"), overhead=0.01)
    n, keys, retries = c.pop("n"), c.pop("keys"), c.pop("retries")
    for arrivals in (
        Arrivals.burst(n, keys=keys, retries=retries, retry_after_s=3.0),
        Arrivals.steady(5.0, 20.0, seed=n, keys=keys, retries=retries, retry_after_s=3.0),
    ):
        result = simulate(prof, Capacity(max_containers=3, **c), arrivals)
        assert len(result.requests) == len(arrivals.times)
        for request in result.requests:
            assert request.served != request.refused
            assert 1 <= request.attempts <= retries + 1
            assert request.refused == (request.admitted_at is None)
        in_batches = [i for batch in result.batches for i in batch.requests]
        assert sorted(in_batches) == sorted(r.id for r in result.served)  # once each
        assert all(1 <= b.size <= c["batch_size"] for b in result.batches)
        assert result.rejections >= len(result.refused)
        assert max(count for _, count in result.timeline) <= 3
        assert all(life.stopped_at is not None for life in result.containers)  # min 0
        for r in result.served:
            assert r.done_at is not None and r.started_at is not None
            assert r.arrived_at <= r.started_at < r.done_at


def test_more_gpus_never_drain_a_burst_slower() -> None:
    for config in configs(25, seed=11):
        c = dict(config)
        prof = profile(cold_start_s=c.pop("cold"))
        c.pop("retries")  # retried 429s arrive later when GPUs free room sooner: not a burst
        arrivals = Arrivals.burst(c.pop("n"), keys=c.pop("keys"))
        drains = [
            drain(simulate(prof, Capacity(max_containers=m, **c), arrivals)) for m in range(1, 7)
        ]
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(drains)), (c, drains)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_more_gpus_never_drain_a_steady_stream_later_than_one_batch(seed: int) -> None:
    """Greedy batching has scheduling anomalies: with a spare container a late input may
    start alone instead of joining a fuller batch. Bounded by one batch plus its wait."""
    prof = profile(cold_start_s=10.5)
    arrivals = Arrivals.steady(6.0, 30.0, seed=seed)
    for batch_size, wait in ((4, 0.15), (8, 0.0)):
        slack = prof.batch_seconds(batch_size) + wait
        drains: list[float] = []
        for m in range(1, 7):
            capacity = Capacity(
                max_containers=m,
                batch_size=batch_size,
                batch_wait_s=wait,
                max_queue=UNLIMITED,
                max_queued_per_key=UNLIMITED,
            )
            drains.append(drain(simulate(prof, capacity, arrivals)))
        assert all(b <= a + slack for a, b in itertools.pairwise(drains)), drains
        assert drains[-1] <= drains[0] + 1e-9


def test_a_longer_idle_window_never_costs_less_for_a_lone_request() -> None:
    prof = profile(cold_start_s=10.0)
    costs: list[float] = []
    for idle in (0.0, 2.0, 30.0, 60.0, 120.0, 600.0):
        result = run(prof, Arrivals.burst(1), scaledown_window_s=idle, batch_wait_s=0.15)
        gpu_s = result.gpu_seconds()
        # cold start, the wait for a batch that never fills, the batch, then the idle window
        assert gpu_s == pytest.approx(10.0 + 0.15 + 0.5 + idle)
        costs.append(gpu_s / 3600 * 4.54)
        assert summarize(result, price_per_gpu_hour=4.54).cost == pytest.approx(costs[-1])
    assert costs == sorted(costs)


@pytest.mark.parametrize("n", [1, 32, 33, 100, 1000])
def test_the_queue_limits_refuse_exactly_the_excess_of_a_burst(n: int) -> None:
    one_key = run(arrivals=Arrivals.burst(n), max_queue=64, max_queued_per_key=32)
    assert len(one_key.refused) == max(0, n - 32)
    assert len(one_key.served) == min(n, 32)
    whole = run(arrivals=Arrivals.burst(n, keys=10), max_queue=64, max_queued_per_key=32)
    assert len(whole.refused) == max(0, n - 64)
    # 3 keys, 32 each: keys get requests round robin, so each key has ceil or floor of n/3
    three = run(arrivals=Arrivals.burst(n, keys=3), max_queue=UNLIMITED, max_queued_per_key=32)
    assert len(three.refused) == sum(max(0, len(range(k, n, 3)) - 32) for k in range(3))


def test_retries_after_a_429_get_served_later() -> None:
    arrivals = Arrivals.burst(40, retries=3, retry_after_s=10.0)
    result = run(
        profile(cold_start_s=2.0), arrivals, max_queue=64, max_queued_per_key=32, max_containers=4
    )
    assert len(result.served) == 40 and not result.refused
    assert result.rejections == 8
    retried = [r for r in result.served if r.attempts > 1]
    assert len(retried) == 8 and all(r.admitted_at == 10.0 for r in retried)
    assert all(r.latency >= 10.0 for r in retried)  # latency counts from the first attempt


@pytest.mark.parametrize("linger", ["modal", "local"])
def test_a_steady_trickle_with_no_cold_start_waits_one_batch_wait_plus_one_batch(
    linger: str,
) -> None:
    prof = profile(cold_start_s=0.0)
    arrivals = Arrivals.steady(0.2, 60.0, poisson=False)  # one every 5 s, never overlapping
    result = simulate(prof, Capacity(batch_wait_s=0.15, linger=linger), arrivals)  # type: ignore[arg-type]
    latencies = [r.latency for r in result.served]
    assert len(latencies) == 12
    assert latencies == pytest.approx([0.15 + 0.5] * 12)
    assert all(b.size == 1 for b in result.batches)
    assert len(result.containers) == 1  # the idle window (120 s) outlasts every gap


def test_a_burst_fills_batches_and_starts_containers_up_to_the_ceiling() -> None:
    prof = profile(cold_start_s=10.0)
    result = run(
        prof,
        Arrivals.burst(64),
        max_containers=4,
        batch_size=8,
        batch_wait_s=0.1,
        scaledown_window_s=120.0,
        max_queue=UNLIMITED,
        max_queued_per_key=UNLIMITED,
    )
    assert len(result.containers) == 4
    assert [b.size for b in result.batches] == [8] * 8
    summary = summarize(result, price_per_gpu_hour=3.6)
    assert summary.drain_s == pytest.approx(10.0 + 2 * 1.8)
    assert summary.latency_p50_s == pytest.approx(10.0 + 1.8 + 1.8 / 2)  # between 32 and 32
    assert summary.latency_p95_s == pytest.approx(10.0 + 2 * 1.8)
    assert summary.containers_max == 4 and summary.containers_mean == pytest.approx(4.0)
    assert summary.gpu_seconds == pytest.approx(4 * (10.0 + 3.6 + 120.0))
    assert summary.cost == pytest.approx(summary.gpu_seconds / 1000)
    assert summary.cost_per_1000_images == pytest.approx(summary.gpu_seconds / 1000 / 64 * 1000)


def test_min_containers_start_warm_and_are_billed_to_the_end() -> None:
    result = run(profile(cold_start_s=30.0), Arrivals.burst(4), min_containers=1, batch_size=4)
    assert result.served[0].latency == pytest.approx(1.0)  # batch of 4, no cold start
    assert result.containers[0].stopped_at is None
    assert result.gpu_seconds() == pytest.approx(result.horizon)


def test_host_work_staggers_completions_within_a_batch() -> None:
    result = run(profile(cold_start_s=0.0, overhead=0.1), Arrivals.burst(4), batch_size=4)
    assert sorted(r.latency for r in result.served) == pytest.approx([1.1, 1.2, 1.3, 1.4])


def test_runs_are_deterministic_given_a_seed() -> None:
    a = Arrivals.steady(3.0, 40.0, seed=42, keys=2)
    assert a == Arrivals.steady(3.0, 40.0, seed=42, keys=2)
    assert a.times != Arrivals.steady(3.0, 40.0, seed=43, keys=2).times
    first = summarize(run(arrivals=a, max_containers=3)).as_dict()
    assert first == summarize(run(arrivals=a, max_containers=3)).as_dict()
    even = Arrivals.steady(4.0, 2.0, poisson=False)
    assert even.times == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def test_report_helpers() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert statistics.quantiles([1, 2, 3, 4, 5], n=100, method="inclusive")[94] == pytest.approx(
        percentile([1, 2, 3, 4, 5], 95)
    )
    timeline = [(0.0, 0), (1.0, 2), (3.0, 1), (5.0, 0)]
    assert time_weighted_mean(timeline, 0.0, 4.0) == pytest.approx((2 * 2 + 1 * 1) / 4)


def test_compare_burst_on_a_burst_the_model_itself_made() -> None:
    """The comparison's plumbing: a 'measurement' the simulator produced has no error."""
    prof = profile(cold_start_s=0.0, overhead=0.02)
    sent = [0.001 * i for i in range(20)]
    capacity = Capacity(
        max_containers=1, min_containers=1, batch_size=4, batch_wait_s=0.02, linger="local"
    )
    truth = simulate(prof, capacity, Arrivals.from_times(sent))
    done = [r.done_at or 0.0 for r in truth.requests]
    measurement = BurstMeasurement(sent, done, server_done_at=done, queued_at=sent)
    calibration = compare_burst(prof, measurement, batch_size=4, batch_wait_s=0.02)
    assert calibration.drain_error == pytest.approx(0.0, abs=1e-9)
    assert calibration.p95_error == pytest.approx(0.0, abs=1e-9)
    assert calibration.queued_drain_s == pytest.approx(calibration.measured_drain_s)
    assert calibration.predicted_batches == 5
    assert "latency p95" in calibration.render()


# -- defaults and the command -------------------------------------------------------------


def modal_defaults() -> dict[str, str]:
    """The deploy-time knobs' defaults: `os.environ.get("MAGICMIX_...", "default")` calls."""
    tree = ast.parse((ROOT / "modal_app.py").read_text())
    return {
        node.args[0].value: node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == "os.environ.get"
        and len(node.args) == 2
        and all(isinstance(arg, ast.Constant) for arg in node.args)
    }


def test_defaults_are_the_deployed_ones() -> None:
    """The shipped profile is SD 1.5's; a deployment of it batches as its family says."""
    knobs, cap = modal_defaults(), Capacity()
    assert cap.batch_size == SD1.batch_size
    assert cap.batch_wait_s == int(knobs["MAGICMIX_BATCH_WAIT_MS"]) / 1000
    assert cap.max_containers == int(knobs["MAGICMIX_MAX_GPUS"])
    assert cap.scaledown_window_s == int(knobs["MAGICMIX_GPU_IDLE_S"])


def test_plan_sizes_the_queue_as_the_service_does(plan_app: typer.Typer) -> None:
    """One capacity model: `plan`'s default queue limit is the service's formula."""
    result = CliRunner().invoke(plan_app, ["plan", "--burst", "10", "--json"])
    assert result.exit_code == 0, result.output
    profile = GpuProfile.load(default_profile_path())
    settings = Settings(
        gpu="H200",
        max_gpus=4,
        batch_size=8,
        seconds_per_image=profile.engine_seconds(8) / 8,
    )
    assert json.loads(result.output)["capacity"]["max_queue"] == settings.max_queue


@pytest.fixture(scope="module")
def plan_app() -> typer.Typer:
    app = typer.Typer()
    app.command("plan")(plan_command)
    app.command("other")(lambda: None)  # two commands, so `plan` is a subcommand as in magicmix
    return app


def test_plan_help_documents_every_input(plan_app: typer.Typer) -> None:
    result = CliRunner().invoke(plan_app, ["plan", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--burst",
        "--rate",
        "--duration",
        "--keys",
        "--gpu-profile",
        "--max-gpus",
        "--batch-size",
        "--batch-wait-ms",
        "--idle-s",
        "--max-queue",
        "--max-queued-per-key",
        "--cold-start-s",
        "--price",
        "--retries",
        "--seed",
        "--json",
    ):
        assert option in result.output, option


QUEUE_64_32 = ["--max-queue", "64", "--max-queued-per-key", "32"]


def test_plan_prints_a_report_and_json(plan_app: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    text = runner.invoke(
        plan_app,
        ["plan", "--burst", "100", "--max-gpus", "8", "--price", "4", *QUEUE_64_32],
    )
    assert text.exit_code == 0, text.output
    assert "time to drain" in text.output and "refused (429)     68" in text.output
    args = [
        "plan",
        "--rate",
        "5",
        "--duration",
        "30",
        "--keys",
        "4",
        "--batch-size",
        "8",
        "--batch-wait-ms",
        "50",
        "--idle-s",
        "30",
        "--max-queue",
        "500",
        "--max-queued-per-key",
        "200",
        "--cold-start-s",
        "3",
        "--retries",
        "1",
        "--seed",
        "3",
        "--json",
    ]
    out = runner.invoke(plan_app, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["served"] + data["refused"] == data["requests"] > 100
    assert data["cold_start_s"] == 3 and data["capacity"]["batch_size"] == 8
    assert data["price_per_gpu_hour"] == 4.54  # the shipped profile's
    p = profile(price_per_gpu_hour=None).save(tmp_path / "p.json")
    priceless = runner.invoke(plan_app, ["plan", "--burst", "3", "--gpu-profile", str(p)])
    assert "no --price" in priceless.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--burst", "3", "--rate", "1"], "either --burst"),
        ([], "either --burst"),
        (["--burst", "3", "--gpu-profile", "/nonexistent.json"], "no profile"),
        (["--burst", "3", "--max-gpus", "0"], "max_containers"),
        (["--rate", "-1"], "rate"),
    ],
)
def test_plan_refuses_bad_input(plan_app: typer.Typer, args: list[str], message: str) -> None:
    result = CliRunner().invoke(plan_app, ["plan", *args])
    assert result.exit_code == 2
    assert message in result.output


# -- the planner against the real local service (slow) ---------------------------------

BURST_JOBS = 48
BURST_BATCH = 4
BURST_SIZE = 256
TOLERANCE = 0.25
POLL_S = 0.1  # as tests/service_fixtures.RunningService.wait_success polls


def layout_data_uri() -> str:
    from tests.conftest import make_layout_image

    buffer = io.BytesIO()
    make_layout_image(BURST_SIZE, BURST_SIZE).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_local_burst(
    model_dir: Path,
    work_dir: Path,
    *,
    jobs: int = BURST_JOBS,
    batch_size: int = BURST_BATCH,
    threads: int = 1,
    repeats: int = 2,
    log: Any = print,
) -> Calibration:
    """Profile the service's engine, burst `jobs` at it, profile again, compare with the plan.

    The profile is taken both before and after the burst (`repeats` rounds each, medians of
    all), so a change in what else runs on the machine hits profile and burst alike. One
    torch thread: on a shared 2-core machine an intra-op thread that gets descheduled stalls
    its partner, which makes timings swing by several times.
    """
    import torch

    from benchmarks.calibrate import profile_from_timings
    from benchmarks.measure import time_batches, time_host_work
    from tests.service_fixtures import MIX, serve, service_settings

    settings = service_settings(
        work_dir,
        model_dir,
        batch_size=batch_size,
        sync_wait_s=0.0,
        max_queue=max(64, jobs),
        max_queued_per_key=max(32, jobs),
        log_level="WARNING",
    )
    sizes = range(1, batch_size + 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with serve(settings) as running:
            engine = service_engine(running.service)
            log(f"profiling the service's engine, batches 1..{batch_size} at {BURST_SIZE} px")
            common = {"width": BURST_SIZE, "height": BURST_SIZE, "repeats": repeats, "log": log}
            before = time_batches(engine, sizes, **common)
            body = {
                "key": running.key,
                "prompt": "Bed",
                "negative_prompt": "low quality",
                "image": layout_data_uri(),
                "width": BURST_SIZE,
                "height": BURST_SIZE,
                "steps": 20,
                "kmin": 0.3,
                "kmax": 0.5,
                "mix_factor": 0.5,
            }
            log(f"bursting {jobs} jobs at the service")
            measurement = burst_and_poll(running, MIX, body, jobs)
            log("profiling again")
            after = time_batches(engine, sizes, warmup=False, **common)
            host = time_host_work(
                width=BURST_SIZE, height=BURST_SIZE, output=before[batch_size].output
            )
    finally:
        torch.set_num_threads(previous_threads)
    per_batch = {n: statistics.median(before[n].runs_s + after[n].runs_s) for n in sizes}
    prof = profile_from_timings(
        "local-cpu-tiny",
        f"cpu, tiny model, {threads} torch thread(s)",
        per_batch,
        sum(host.values()),
        source="tests/test_planner.py run_local_burst",
        notes=[f"host work per image: {host}"],
    )
    calibration = compare_burst(
        prof, measurement, batch_size=batch_size, batch_wait_s=settings.batch_wait_ms / 1000
    )
    log(calibration.render())
    return calibration


def service_engine(service: Any) -> Any:
    """The engine the local worker thread loaded."""
    engine = getattr(service.dispatcher, "engine", None)
    assert engine is not None, "the local worker has no engine loaded"
    return engine


def burst_and_poll(running: Any, path: str, body: dict[str, Any], jobs: int) -> BurstMeasurement:
    """POST `jobs` requests at once (a barrier), then poll fetch until each is `success`.

    One poller walks the jobs in id order (the worker claims oldest first, so they finish
    in that order), fetching the first unfinished one every `POLL_S`: ~10 requests/s.
    Polling all 48 each round would be ~200 requests/s of Python in this process, which
    takes the GIL from the worker thread and slows the very thing being measured.
    """
    barrier = threading.Barrier(jobs)
    origin_mono, origin_wall = time.monotonic(), time.time()

    def submit(i: int) -> tuple[int, float]:
        barrier.wait()
        sent = time.monotonic() - origin_mono
        reply = running.post(path, {**body, "seed": 1000 + i})
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["status"] in ("processing", "success"), data
        return int(data["id"]), sent

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        submitted = list(pool.map(submit, range(jobs)))
    first = min(sent for _, sent in submitted)
    sent_at = {job_id: sent - first for job_id, sent in submitted}
    seen: dict[int, float] = {}
    polls = 0
    deadline = time.monotonic() + 240
    for job_id in sorted(sent_at):
        while True:
            assert time.monotonic() < deadline, f"only {len(seen)}/{jobs} jobs done in 240 s"
            polls += 1
            reply = running.fetch(job_id).json()
            if reply["status"] == "success":
                seen[job_id] = time.monotonic() - origin_mono - first
                break
            assert reply["status"] == "processing", reply
            time.sleep(POLL_S)
    ids = sorted(sent_at)
    records = [running.service.jobs.get(i) for i in ids]
    by_engine_call: dict[float, int] = {}  # jobs of one batch share the engine call's time
    for record in records:
        by_engine_call[record.result.generation_time] = (
            by_engine_call.get(record.result.generation_time, 0) + 1
        )
    return BurstMeasurement(
        sent_at=[sent_at[i] for i in ids],
        seen_done_at=[seen[i] for i in ids],
        server_done_at=[record.finished_at - origin_wall - first for record in records],
        queued_at=[record.created_at - origin_wall - first for record in records],
        poll_interval_s=POLL_S,
        service_batches=[(n, seconds) for seconds, n in by_engine_call.items()],
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_planner_predicts_a_real_local_burst(tiny_model_dir: Path, tmp_path: Path) -> None:
    calibration = run_local_burst(tiny_model_dir, tmp_path)
    assert abs(calibration.drain_error) <= TOLERANCE, calibration.render()
    assert abs(calibration.p95_error) <= TOLERANCE, calibration.render()


def main() -> None:
    """`python -m tests.test_planner`: run the comparison once and print it."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from magicmix.engine.builder import build_random_model

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_random_model(Path(scratch) / "tiny", "tiny")
        run_local_burst(model_dir, Path(scratch) / "svc")


if __name__ == "__main__":
    main()
