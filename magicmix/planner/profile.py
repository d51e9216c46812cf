"""Measured figures the planner runs on: GPU seconds per batch by batch size, and cold start.

A `GpuProfile` is a JSON file. The default one ships in the package (`profiles/`, package
data, so an installed `magicmix plan` finds it); it and the compiled-path one in
`benchmarks/results/` were made from the H200 runs in `benchmarks/results/gpu-h200-2026-11-27*`.
Any machine can make its own with `python -m benchmarks.make_profile --out FILE`, which times
the engine as the `MAGICMIX_*` settings configure it.

`per_batch_s` holds only what was measured (the engine call, `engine.mix`). After it the job
runner decodes, PNG-encodes and stores each image in turn (`JobRunner._store`), holding the
container: `per_image_overhead_s` per image, so the i-th job of a batch of n is done at
engine(n) + (i + 1) x overhead and the container is free at engine(n) + n x overhead.
Other batch sizes are derived, never stored:

* between two measured sizes: linear in the batch size (a batch's time is a fixed part,
  the text encoder, scheduler and kernel launches, plus a part per image);
* below the smallest measured size: the smallest's time (an upper bound: a batch never
  gets cheaper than this from the data alone);
* above the largest: the largest's time per image, times the size (batching gains are
  assumed to stop where the measurements stop, which is conservative).

With `batch_buckets` (the compiled path pads each UNet batch up to a bucket so a few
graphs serve every size, `EngineOptions.batch_buckets`), a batch of n costs what the
smallest bucket >= n costs: also an upper bound, since the VAE is not padded.
"""

from __future__ import annotations

import itertools
import json
from datetime import date
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SHIPPED_PROFILE = "profile-h200-2026-11-27.json"


def default_profile_path() -> Path:
    """The shipped H200 profile (fp16 + SDPA, the default engine path): package data, beside
    this module wherever the package is installed."""
    return Path(__file__).resolve().with_name("profiles") / SHIPPED_PROFILE


class GpuProfile(BaseModel):
    """What one GPU container does per batch, and how long it takes to start."""

    model_config = ConfigDict(extra="forbid")

    name: str
    device: str = Field(description="e.g. 'NVIDIA H200' or 'cpu (2 cores)'")
    measured_on: date
    source: str = Field(description="where the figures come from: files, command")
    request: dict[str, float | int | str] = Field(
        default_factory=dict,
        description="the request measured: width, height, steps, kmax, ...",
    )
    per_batch_s: dict[int, float] = Field(
        description="measured seconds for one batch, by batch size (end to end, engine.mix)"
    )
    per_image_overhead_s: float = Field(
        default=0.0,
        ge=0,
        description="host seconds per image inside the batch, after the engine call:"
        " decode, PNG encode, store (JobRunner); one image after another",
    )
    batch_buckets: list[int] | None = Field(
        default=None, description="batches are padded up to these sizes (compiled path)"
    )
    cold_start_s: float = Field(
        ge=0, description="container start to taking work: boot, restore, load, warm-up"
    )
    cold_start_parts: dict[str, float] = Field(
        default_factory=dict, description="cold_start_s broken down; sums to it"
    )
    cold_start_measured: list[str] = Field(
        default_factory=list, description="which parts were measured (the rest are assumed)"
    )
    price_per_gpu_hour: float | None = Field(default=None, ge=0)
    notes: list[str] = Field(default_factory=list)

    @field_validator("per_batch_s")
    @classmethod
    def _positive(cls, value: dict[int, float]) -> dict[int, float]:
        if not value:
            raise ValueError("per_batch_s needs at least one measured batch size")
        for size, seconds in value.items():
            if size < 1 or not seconds > 0:
                raise ValueError(f"per_batch_s[{size}] = {seconds}: need size >= 1, seconds > 0")
        return dict(sorted(value.items()))

    @field_validator("batch_buckets")
    @classmethod
    def _buckets(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("batch_buckets must be sizes >= 1")
        return sorted(set(value)) if value is not None else None

    @model_validator(mode="after")
    def _parts_sum(self) -> GpuProfile:
        if self.cold_start_parts:
            total = sum(self.cold_start_parts.values())
            if abs(total - self.cold_start_s) > 0.01 * max(self.cold_start_s, 1.0):
                raise ValueError(
                    f"cold_start_parts sum to {total:.3f}s, not cold_start_s={self.cold_start_s}"
                )
        unknown = set(self.cold_start_measured) - set(self.cold_start_parts)
        if unknown:
            raise ValueError(f"cold_start_measured names unknown parts: {sorted(unknown)}")
        return self

    # -- derived figures ----------------------------------------------------------------

    def batch_seconds(self, size: int) -> float:
        """Seconds a container is held by one batch of `size`: the engine, then host work."""
        return self.engine_seconds(size) + size * self.per_image_overhead_s

    def engine_seconds(self, size: int) -> float:
        """The engine call for a batch of `size` (see the module docstring for the rules)."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        if self.batch_buckets:
            size = next((b for b in self.batch_buckets if b >= size), size)
        points = sorted(self.per_batch_s.items())
        if size in self.per_batch_s:
            return self.per_batch_s[size]
        smallest, largest = points[0], points[-1]
        if size < smallest[0]:
            return smallest[1]
        if size > largest[0]:
            return largest[1] / largest[0] * size
        for (lo, lo_s), (hi, hi_s) in itertools.pairwise(points):
            if lo < size < hi:
                return lo_s + (hi_s - lo_s) * (size - lo) / (hi - lo)
        raise AssertionError("unreachable: size lies within the measured range")

    def seconds_per_image(self, size: int) -> float:
        return self.batch_seconds(size) / size

    def with_cold_start(self, seconds: float) -> GpuProfile:
        """A copy with the cold start replaced (the `--cold-start-s` override)."""
        return self.model_copy(
            update={
                "cold_start_s": seconds,
                "cold_start_parts": {"override": seconds},
                "cold_start_measured": [],
            }
        )

    # -- files ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> GpuProfile:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(self.model_dump_json())
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path
