"""The service around the engine: (c) HTTP end to end vs the direct engine call, and
(d) throughput at 1, 4 and 16 concurrent clients with cross-request batching on vs off.

Both run the real app (FastAPI under uvicorn, SQLite jobs, the worker thread) in this
process on a loopback port, started as the test suite does (`tests.service_fixtures`),
and POST the API's seed example with the layout inline as base64. (c) also reads each
reply's `generationTime` (the engine call inside the worker) so the overhead is measured
inside the same request, not only as the difference of two noisy medians.

    python -m benchmarks.service [--quick] [--out DIR]
"""

from __future__ import annotations

import io
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
from PIL import Image

from benchmarks.common import (
    Comparison,
    Context,
    Section,
    Target,
    benchmark,
    interleaved,
    layout_png,
    log,
    run_suite,
    seed_body,
    seed_request,
    timed,
)
from magicmix.engine import MagicMixEngine
from magicmix.http.schemas import MagicMixIn
from magicmix.inputs.images import decode_image, decode_inline_image, png_bytes
from tests.http_fixtures import free_port
from tests.service_fixtures import MIX, RunningService, serve

CLIENT_TIMEOUT_S = 600.0
SYNC_WAIT_S = 140.0  # the API's maximum: every reply is final, never `processing`
OVERHEAD_SIZE = 768  # where the overhead target applies
OVERHEAD_TARGET = Target("<=", 1.05)
THROUGHPUT_SIZE = 256
THROUGHPUT_TARGET = Target(">=", 1.5)  # at the most clients
BATCHING_ON = {"batch_size": 16, "batch_wait_ms": 50}
BATCHING_OFF = {"batch_size": 1, "batch_wait_ms": 0}


@contextmanager
def served(ctx: Context, name: str, **overrides: Any) -> Iterator[RunningService]:
    """The real app on a free loopback port, `MAGICMIX_*` defaults plus `overrides`."""
    settings = ctx.settings(
        data_dir=ctx.work_dir / name,
        public_url=f"http://127.0.0.1:{free_port()}",
        sync_wait_s=SYNC_WAIT_S,
        **overrides,
    )
    with serve(settings) as running:
        yield running


def post_mix(http: httpx.Client, running: RunningService, body: dict[str, Any]) -> dict[str, Any]:
    """POST magic_mix; any reply but `success` is a failed benchmark, not a slow one."""
    reply: dict[str, Any] = http.post(running.base_url + MIX, json=body).json()
    if reply.get("status") != "success":
        raise RuntimeError(f"magic_mix did not succeed: {reply}")
    return reply


def engine_of(running: RunningService) -> MagicMixEngine:
    engine = running.service.dispatcher.engine  # type: ignore[attr-defined]
    assert isinstance(engine, MagicMixEngine)  # nosec B101 - serve() waits for the load
    return engine


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def png_at(image: Image.Image, level: int) -> bytes:
    """PNG at a given zlib level (the service uses PIL's default, 6)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def stage_seconds(
    running: RunningService, body: dict[str, Any], output: Image.Image
) -> dict[str, float]:
    """Each non-engine stage of a request, timed with the service's own functions."""
    settings = running.settings
    raw = json.dumps(body).encode()
    data = decode_inline_image(body["image"], max_bytes=settings.max_image_bytes)
    assert data is not None  # nosec B101 - the body carries the image inline
    png = png_bytes(output)
    store = running.service.outputs.service
    return {
        "parse body (JSON + pydantic)": median_seconds(lambda: MagicMixIn.model_validate_json(raw)),
        "base64 decode": median_seconds(
            lambda: decode_inline_image(body["image"], max_bytes=settings.max_image_bytes)
        ),
        "decode layout x2 (API, worker)": 2
        * median_seconds(lambda: decode_image(data, max_pixels=settings.max_image_pixels)),
        "batch wait (sleep)": settings.batch_wait_ms / 1000,
        "PNG encode output": median_seconds(lambda: png_bytes(output)),
        "store output": median_seconds(lambda: store.put("bench.png", png)),
    }


def compare_http_with_engine(
    running: RunningService, http: httpx.Client, size: int, repeats: int, out: Section
) -> Comparison:
    """Seconds per sequential request over HTTP vs `engine.mix` on the same request."""
    engine = engine_of(running)
    data = layout_png(size)
    body = seed_body(running.key, data, size)
    request = seed_request(decode_image(data, max_pixels=running.settings.max_image_pixels), size)
    in_worker: list[float] = []

    def via_http() -> None:
        in_worker.append(post_mix(http, running, body)["generationTime"])

    samples = interleaved(
        {"http": via_http, "engine": lambda: engine.mix([request], progress=False)}, repeats
    )
    (result,) = engine.mix([request], progress=False)
    outside = statistics.median(t - g for t, g in zip(samples["http"], in_worker[1:], strict=True))
    stages = stage_seconds(running, body, result.image)
    stages["rest (SQLite, wake-ups, event loop, reply)"] = outside - sum(stages.values())
    out.details[f"{size}x{size}"] = {
        "request_body_bytes": len(json.dumps(body)),
        "http_minus_generationTime_s": outside,
        "stages_s": stages,
    }
    png_what_if = {
        "noise output, compress_level=1": median_seconds(lambda: png_at(result.image, 1)),
        "structured layout, default level": median_seconds(lambda: png_bytes(request.image)),
    }
    out.details[f"{size}x{size}"]["png_encode_what_if_s"] = png_what_if
    breakdown = ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in stages.items())
    what_if = ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in png_what_if.items())
    out.notes.append(
        f"{size}x{size}: time outside the engine call inside each request (HTTP time minus the"
        f" reply's generationTime), median {outside * 1000:.0f} ms; by stage, ms: {breakdown}."
        f" PNG encode of the same size for comparison, ms: {what_if}."
    )
    return Comparison(
        case=f"{size}x{size}, sequential",
        unit="s/image",
        label="HTTP end to end",
        samples=samples["http"],
        baseline_label="engine.mix",
        baseline_samples=samples["engine"],
        target=OVERHEAD_TARGET if size == OVERHEAD_SIZE else None,
        note=f"in-request time outside the engine: {outside:.3f}s",
    )


@benchmark("c", "HTTP end to end vs the direct engine call (same engine, same request)")
def http_vs_engine(ctx: Context, out: Section) -> None:
    """Sequential requests, alternating HTTP and a direct call on the server's own engine."""
    with served(ctx, "overhead") as running, httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
        for size in sorted(ctx.sizes, reverse=True):
            out.comparisons.append(compare_http_with_engine(running, http, size, ctx.repeats, out))
    out.notes.append(
        "Server with `MAGICMIX_*` defaults (batch 4, batch_wait 25 ms); overhead ="
        " (http - engine) / engine = ratio - 1. Stages are timed apart with the service's own"
        " functions on the same body and output; `rest` is what they leave unexplained."
    )


def burst(running: RunningService, clients: int, png: bytes) -> tuple[float, int]:
    """`clients` threads POST one request each, released together: (images/s, UNet batches).

    Jobs claimed together share a `started_at`, so the distinct values count the batches.
    """
    bodies = [seed_body(running.key, png, THROUGHPUT_SIZE, seed=1000 + i) for i in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(body: dict[str, Any]) -> int:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
            start.wait()
            return int(post_mix(http, running, body)["id"])

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, body) for body in bodies]
        start.wait()
        began = time.perf_counter()
        job_ids = [future.result() for future in futures]
        seconds = time.perf_counter() - began
    jobs = [running.service.jobs.get(job_id) for job_id in job_ids]
    batches = len({job.started_at for job in jobs if job is not None})
    return clients / seconds, batches


def describe_batching(name: str, settings: dict[str, int]) -> str:
    return f"batching {name} (size {settings['batch_size']}, {settings['batch_wait_ms']} ms)"


@benchmark("d", f"throughput, batching on vs off, {THROUGHPUT_SIZE}x{THROUGHPUT_SIZE}")
def throughput(ctx: Context, out: Section) -> None:
    """Images/s for bursts of 1, 4, 16 clients; two servers alive at once, rounds alternate."""
    levels = (1, 4) if ctx.quick else (1, 4, 16)
    rounds = 1 if ctx.quick else 3
    png = layout_png(THROUGHPUT_SIZE)
    batches: dict[str, dict[int, list[int]]] = {"on": {}, "off": {}}  # per round, by clients
    with (
        served(ctx, "batching-on", **BATCHING_ON) as on,
        served(ctx, "batching-off", **BATCHING_OFF) as off,
    ):
        for running in (on, off):  # first request loads lazily-initialised kernels
            burst(running, 1, png)
        for clients in levels:
            samples: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(rounds):
                for name, running in (("off", off), ("on", on)):
                    rate, formed = burst(running, clients, png)
                    samples[name].append(rate)
                    batches[name].setdefault(clients, []).append(formed)
                    log(f"  {clients} clients, batching {name}: {rate:.2f} img/s, {formed} batches")
            out.comparisons.append(
                Comparison(
                    case=f"{clients} clients x {rounds} rounds",
                    unit="images/s",
                    label=describe_batching("on", BATCHING_ON),
                    samples=samples["on"],
                    baseline_label=describe_batching("off", BATCHING_OFF),
                    baseline_samples=samples["off"],
                    target=THROUGHPUT_TARGET if clients == max(levels) else None,
                )
            )
    out.details["unet_batches_per_round"] = batches
    out.notes.append(
        "Each round releases every client at once (one request each, a barrier) and ends when"
        " the last reply arrives; images/s = clients / wall seconds; median over rounds."
        " Clients, the two servers and their workers share this process and its 2 cores."
        f" Engine batches formed per round with batching on, by clients: {batches['on']}.",
    )


BENCHES = (http_vs_engine, throughput)


def main(argv: Sequence[str] | None = None) -> None:
    run_suite(BENCHES, argv, default_out=None)


if __name__ == "__main__":
    main()
