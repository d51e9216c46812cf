"""`magicmix plan`: the simulator (`magicmix.planner`) as a command, beside the others.

Imports nothing heavy (no torch): planning runs anywhere, in well under a second for
thousands of requests.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from magicmix.capacity import queue_limit
from magicmix.cli.options import fail
from magicmix.families import SD1
from magicmix.planner.profile import GpuProfile, default_profile_path
from magicmix.planner.report import render_text, summarize
from magicmix.planner.sim import Arrivals, Capacity, simulate


class Linger(StrEnum):
    modal = "modal"
    local = "local"


def plan_command(
    burst: Annotated[
        int | None,
        typer.Option(help="A burst: this many requests all at t=0. Or use --rate/--duration."),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="A steady load: requests per second (Poisson unless --even)."),
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds the steady --rate lasts.")] = 60.0,
    even: Annotated[
        bool, typer.Option("--even", help="Space --rate arrivals evenly instead of Poisson.")
    ] = False,
    keys: Annotated[
        int,
        typer.Option(
            help="API keys the requests come from (round robin); each key has its"
            " own --max-queued-per-key."
        ),
    ] = 1,
    gpu_profile: Annotated[
        Path | None,
        typer.Option(
            help="GpuProfile JSON: per-batch seconds by batch size, cold start (make one with"
            " `python -m benchmarks.make_profile --out FILE`). Default: the H200 profile shipped"
            " in the package, magicmix/planner/profiles/profile-h200-2026-11-27.json"
            " (fp16 + SDPA)."
        ),
    ] = None,
    max_gpus: Annotated[
        int, typer.Option(help="Most GPU containers at once (MAGICMIX_MAX_GPUS at deploy).")
    ] = 4,
    min_gpus: Annotated[
        int, typer.Option(help="GPU containers kept warm from t=0 (Modal min_containers).")
    ] = 0,
    batch_size: Annotated[
        int, typer.Option(help="@modal.batched max_batch_size (MAGICMIX_BATCH_SIZE at deploy).")
    ] = SD1.batch_size,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            help="@modal.batched wait_ms: how long a container waits for its batch"
            " to fill after its first input (MAGICMIX_BATCH_WAIT_MS at deploy)."
        ),
    ] = 100.0,
    idle_s: Annotated[
        float,
        typer.Option(
            help="Idle seconds before a GPU container stops, billed"
            " (scaledown_window, MAGICMIX_GPU_IDLE_S at deploy)."
        ),
    ] = 30.0,
    max_queue: Annotated[
        int,
        typer.Option(
            help="Active jobs (queued + running, all keys) above which the web tier"
            " answers 429 (MAGICMIX_MAX_QUEUE). 0: as the service sizes it, the work the"
            " GPUs drain in --queue-minutes at the profile's speed (magicmix/capacity.py)."
        ),
    ] = 0,
    queue_minutes: Annotated[
        float, typer.Option(help="Minutes of work the queue holds at full scale (0 above).")
    ] = 5.0,
    max_queued_per_key: Annotated[
        int,
        typer.Option(
            help="Active jobs per key above which that key gets 429"
            " (MAGICMIX_MAX_QUEUED_PER_KEY; 0: the whole queue, as the service does)."
        ),
    ] = 0,
    cold_start_s: Annotated[
        float | None,
        typer.Option(
            help="Seconds from a container's start to taking work; overrides the"
            " profile's (which counts boot, snapshot restore, weights to GPU, warm-up)."
        ),
    ] = None,
    price: Annotated[
        float | None,
        typer.Option(
            help="Dollars per GPU-hour; default: the profile's price_per_gpu_hour"
            " (shipped H200: 4.54, Modal's $0.001261/s)."
        ),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(
            help="Times a client retries a 429 after --retry-after-s (ModelsLab SDKs"
            " raise on non-200: default 0)."
        ),
    ] = 0,
    retry_after_s: Annotated[
        float,
        typer.Option(
            help="Seconds a client waits before retrying a 429 (the service sends retry_after=10)."
        ),
    ] = 10.0,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrivals (--rate).")] = 0,
    linger: Annotated[
        Linger,
        typer.Option(
            help="Batching rule: 'modal' (@modal.batched) or 'local' (the local"
            " worker: sleeps the wait once on waking, then drains)."
        ),
    ] = Linger.modal,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON instead of text.")
    ] = False,
) -> None:
    """Simulate a burst or a steady load on the deployed system: time to drain, latency
    p50/p95/p99, requests refused (429), GPU containers over time, GPU-seconds and cost.

    The model (web-tier queue limits, Modal's autoscaler and cold starts, @modal.batched,
    idle scale-down, per-second billing) is described in magicmix/planner/sim.py.
    """
    if (burst is None) == (rate is None):
        raise fail("give either --burst N or --rate R (with --duration S)")
    path = gpu_profile or default_profile_path()
    try:
        profile = GpuProfile.load(path)
    except FileNotFoundError:
        raise fail(f"no profile at {path}; pass --gpu-profile FILE") from None
    except ValidationError as err:
        raise fail(f"{path} is not a GpuProfile: {err}") from None
    if cold_start_s is not None:
        if cold_start_s < 0:
            raise fail("--cold-start-s must be >= 0")
        profile = profile.with_cold_start(cold_start_s)
    try:
        max_queue = max_queue or queue_limit(
            max_gpus=max_gpus,
            seconds_per_image=profile.engine_seconds(batch_size) / batch_size,
            queue_minutes=queue_minutes,
        )
        capacity = Capacity(
            max_containers=max_gpus,
            batch_size=batch_size,
            batch_wait_s=batch_wait_ms / 1000,
            scaledown_window_s=idle_s,
            max_queue=max_queue,
            max_queued_per_key=max_queued_per_key or max_queue,
            min_containers=min_gpus,
            linger=linger.value,
        )
        if burst is not None:
            if burst < 0:
                raise ValueError("--burst must be >= 0")
            arrivals = Arrivals.burst(
                burst, keys=keys, retries=retries, retry_after_s=retry_after_s
            )
        else:
            assert rate is not None  # nosec B101 - checked above
            arrivals = Arrivals.steady(
                rate,
                duration,
                poisson=not even,
                seed=seed,
                keys=keys,
                retries=retries,
                retry_after_s=retry_after_s,
            )
    except ValueError as err:
        raise fail(str(err)) from None
    if price is not None and price < 0:
        raise fail("--price must be >= 0")
    summary = summarize(simulate(profile, capacity, arrivals), price_per_gpu_hour=price)
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        typer.echo(render_text(summary))
