"""One capacity model: how much queued work a deployment accepts, from how fast it drains.

A deployment drains `max_gpus / seconds_per_image` images a second at full scale. The
queue limit is the work that drains in `queue_minutes` at that rate: a burst that size
is accepted whole (no 429) and served within about `queue_minutes` plus cold starts;
beyond it, clients get 429 with `retry_after` instead of waiting longer. `magicmix plan`
says what a given burst will do under these knobs.

Seconds per image at full batch, SD 1.5 architecture, 768x768, 20 steps, kmax 0.5, fp16:
H200 is measured (benchmarks/results/gpu-h200-2026-11-27.md, batch 8: 0.231 s); the other
GPUs are scaled from it by dense fp16 throughput and memory bandwidth, unmeasured. Other
model families cost their `ModelFamily.cost` times as much per image.
"""

from __future__ import annotations

import math

from magicmix.families import DEFAULT, ModelFamily

SECONDS_PER_IMAGE = {
    "H200": 0.23,
    "B200": 0.17,
    "H100": 0.27,
    "A100-80GB": 0.45,
    "A100": 0.5,
    "L40S": 0.55,
    "A10G": 1.2,
    "A10": 1.2,
    "L4": 1.6,
    "T4": 3.0,
    "CPU": 2.0,  # the local tiny model at 768 px on 2 cores
}


def seconds_per_image(gpu: str, family: ModelFamily = DEFAULT) -> float:
    """The table's figure for `gpu` (unknown GPUs count as an L40S), for `family`."""
    base = SECONDS_PER_IMAGE.get(gpu.upper(), SECONDS_PER_IMAGE["L40S"])
    return base * family.cost


def queue_limit(*, max_gpus: int, seconds_per_image: float, queue_minutes: float) -> int:
    """Jobs the deployment drains in `queue_minutes` at full scale (at least 8)."""
    return max(8, math.ceil(max_gpus * queue_minutes * 60 / seconds_per_image))
