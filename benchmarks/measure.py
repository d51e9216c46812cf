"""Timing a loaded engine for a `GpuProfile`: seconds per batch by size, host work per image.

Used by `python -m benchmarks.make_profile` and by the planner's check against the real local
service (tests/test_planner.py, with `benchmarks.calibrate`). It takes any object with the
engine's `mix(requests, progress=False)`, so this module imports no torch.
"""

from __future__ import annotations

import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from magicmix.inputs.images import decode_image, png_bytes
from magicmix.request import MixRequest

SEED_PROMPT = "Bed"  # the API's seed example
SEED_NEGATIVE = "low quality"


class Engine(Protocol):
    def mix(self, requests: Sequence[Any], *, progress: bool = ...) -> Sequence[Any]: ...


def layout_image(width: int, height: int) -> Image.Image:
    """A deterministic layout with structure (gradients and a block), PIL only."""
    red = Image.linear_gradient("L").rotate(90).resize((width, height))
    green = Image.linear_gradient("L").resize((width, height))
    blue = Image.radial_gradient("L").resize((width, height))
    image = Image.merge("RGB", (red, green, blue))
    image.paste((200, 60, 40), (width // 4, height // 4, width // 2, height // 2))
    return image


@dataclass
class BatchTiming:
    size: int
    first_s: float  # the first run at this size (warm-up: allocator, autotuning, compile)
    runs_s: list[float] = field(default_factory=list)
    output: Image.Image | None = None  # an image the last run made (to time PNG encoding)

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


def seed_requests(
    n: int,
    *,
    width: int,
    height: int,
    steps: int,
    kmin: float,
    kmax: float,
    prompt: str = SEED_PROMPT,
    run: int = 0,
) -> list[Any]:
    """`n` seed-example requests (distinct seeds); `prompt` is shared, as in a burst."""
    image = layout_image(width, height)
    return [
        MixRequest(
            image=image,
            prompt=prompt,
            negative_prompt=SEED_NEGATIVE,
            width=width,
            height=height,
            steps=steps,
            kmin=kmin,
            kmax=kmax,
            seed=1829183163 + 1000 * run + i,
        )
        for i in range(n)
    ]


def time_batches(
    engine: Engine,
    sizes: Sequence[int],
    *,
    width: int,
    height: int,
    steps: int = 20,
    kmin: float = 0.3,
    kmax: float = 0.5,
    repeats: int = 3,
    fresh_prompts: bool = False,
    warmup: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] = lambda message: None,
) -> dict[int, BatchTiming]:
    """One warm-up per size, then `repeats` rounds over the sizes, interleaved.

    Round robin rather than one block per size, so a burst of load from another process
    slows every size alike. With `fresh_prompts` every run encodes a new prompt (as
    benchmarks/gpu.py does); by default the prompt repeats, as in a burst of equal requests,
    so the engine's text cache answers after the warm-up. `warmup=False` skips the warm-up
    runs (an engine already warm at these sizes): `first_s` is then the first timed run.
    """
    timings: dict[int, BatchTiming] = {}

    def once(size: int, run: int) -> tuple[float, Image.Image | None]:
        prompt = f"{SEED_PROMPT} {run}" if fresh_prompts else SEED_PROMPT
        requests = seed_requests(
            size,
            width=width,
            height=height,
            steps=steps,
            kmin=kmin,
            kmax=kmax,
            prompt=prompt,
            run=run,
        )
        start = clock()
        results = engine.mix(requests, progress=False)
        seconds = clock() - start
        return seconds, getattr(results[0], "image", None) if results else None

    for size in sizes:
        if warmup:
            first, output = once(size, 0)
            log(f"  warm-up batch {size}: {first:.3f}s")
        else:
            first, output = math.nan, None
        timings[size] = BatchTiming(size, first_s=first, output=output)
    for round_ in range(repeats):
        for size in sizes:
            seconds, output = once(size, round_ + 1)
            timings[size].runs_s.append(seconds)
            timings[size].output = output
            if math.isnan(timings[size].first_s):
                timings[size].first_s = seconds
            log(f"  round {round_ + 1}/{repeats} batch {size}: {seconds:.3f}s")
    return timings


def time_host_work(
    *,
    width: int,
    height: int,
    output: Image.Image | None = None,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """What the job runner does per image around the engine call, median seconds each.

    `decode_layout`: the stored layout image decoded again for the engine (a PNG of the
    output size here); `png_encode`: `png_bytes` (zlib level 1) of `output`, an image the
    engine made (PNG time depends on content: pass a real one), else of the synthetic
    layout; `store`: writing it to a local file (the local store; an S3 upload on Modal is
    not timed). The job-record writes are not timed.
    """
    image = layout_image(width, height)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    layout_png = buffer.getvalue()
    encoded = output if output is not None else image
    samples: dict[str, list[float]] = {"decode_layout": [], "png_encode": [], "store": []}
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "out.png"
        for _ in range(repeats):
            start = clock()
            decode_image(layout_png, max_pixels=40_000_000)
            samples["decode_layout"].append(clock() - start)
            start = clock()
            data = png_bytes(encoded)
            samples["png_encode"].append(clock() - start)
            start = clock()
            target.write_bytes(data)
            samples["store"].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
