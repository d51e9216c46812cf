"""Shared pieces of the CPU suite: interleaved timing, the tiny model, the seed request, the report.

Every figure is a `Comparison`: a measurement next to its baseline, both taken in the same
run and interleaved (A, B, A, B, ...), so load from other processes hits both alike and the
ratio stays meaningful even when the absolute seconds do not.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from benchmarks.gpu import layout_image, version_of
from magicmix.config import Settings
from magicmix.engine.builder import build_random_model
from magicmix.http.schemas import SEED_EXAMPLE
from magicmix.inputs.images import png_bytes
from magicmix.request import MixRequest

TORCH_THREADS = 2  # the CPU budget the suite is sized for (and what `make bench` reports)
# Above this 1-minute load, something else competes for the cores: an intra-op thread that
# is descheduled stalls every torch op of its partner, so numbers lose their meaning.
CONTENDED_LOAD = 0.5
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_SIZES = (256, 768)
QUICK_SIZES = (256,)

# -- timing -------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Warm each candidate once, then time them round-robin `repeats` times.

    Round-robin rather than one block per candidate: a burst of load from another process
    then slows every candidate, not just whichever happened to be running.
    """
    for name, fn in (warmups or candidates).items():
        log(f"  warm-up {name}")
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(repeats):
        for name, fn in candidates.items():
            samples[name].append(timed(fn))
            log(f"  round {round_ + 1}/{repeats} {name}: {samples[name][-1]:.3f}s")
    return samples


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)


# -- figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a ratio must satisfy, e.g. `<= 1.05`."""

    op: Literal["<=", ">="]
    limit: float

    def met(self, ratio: float) -> bool:
        return ratio <= self.limit if self.op == "<=" else ratio >= self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}"


@dataclass
class Comparison:
    """One figure and its baseline, measured side by side; ratio = candidate / baseline."""

    case: str
    unit: str  # "s/image", "images/s", "s"
    label: str
    samples: list[float]
    baseline_label: str
    baseline_samples: list[float]
    target: Target | None = None
    note: str = ""

    @property
    def value(self) -> float:
        return statistics.median(self.samples)

    @property
    def baseline(self) -> float:
        return statistics.median(self.baseline_samples)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.ratio)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "unit": self.unit,
            "candidate": self.label,
            "median": self.value,
            "samples": self.samples,
            "baseline": self.baseline_label,
            "baseline_median": self.baseline,
            "baseline_samples": self.baseline_samples,
            "ratio": self.ratio,
            "target": None if self.target is None else f"ratio {self.target}",
            "met": self.met,
            "note": self.note,
        }


@dataclass
class Section:
    """One lettered part of the suite: its figures, what they mean, and raw extras."""

    key: str
    title: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "seconds": self.seconds,
            "loadavg_before": self.load_before,
            "loadavg_after": self.load_after,
            "figures": [c.to_json() for c in self.comparisons],
            "notes": self.notes,
            "details": self.details,
        }


# -- inputs -------------------------------------------------------------------------------


@dataclass
class Context:
    """What every benchmark gets: the tiny model, a scratch dir, and how hard to measure."""

    model_dir: Path
    work_dir: Path
    quick: bool
    repeats: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return QUICK_SIZES if self.quick else FULL_SIZES

    def settings(self, **overrides: Any) -> Settings:
        """`MAGICMIX_*` defaults (what users run) on the tiny model, on the CPU, quiet logs."""
        values: dict[str, Any] = {
            "model": str(self.model_dir),
            "data_dir": self.work_dir / "data",
            "device": "cpu",
            "log_level": "WARNING",
        }
        return Settings(**{**values, **overrides})


def seed_request(image: Image.Image, size: int, seed: int | None = None) -> MixRequest:
    """The API's seed example (Bed, kmin 0.3, kmax 0.5, 20 steps) at `size` x `size`."""
    return MixRequest(
        image=image,
        prompt=SEED_EXAMPLE["prompt"],
        negative_prompt=SEED_EXAMPLE["negative_prompt"],
        width=size,
        height=size,
        kmin=SEED_EXAMPLE["kmin"],
        kmax=SEED_EXAMPLE["kmax"],
        mix_factor=SEED_EXAMPLE["mix_factor"],
        steps=SEED_EXAMPLE["steps"],
        seed=SEED_EXAMPLE["seed"] if seed is None else seed,
    )


def seed_body(key: str, image_png: bytes, size: int, seed: int | None = None) -> dict[str, Any]:
    """The seed example as a `magic_mix` body, the layout inline as base64."""
    return {
        **SEED_EXAMPLE,
        "key": key,
        "image": base64.b64encode(image_png).decode(),
        "width": size,
        "height": size,
        "seed": SEED_EXAMPLE["seed"] if seed is None else seed,
    }


def layout_png(size: int) -> bytes:
    """A structured (not flat) layout picture as PNG bytes."""
    return png_bytes(layout_image(size))


# -- the machine --------------------------------------------------------------------------


def configure_torch(threads: int = TORCH_THREADS) -> int:
    """Pin torch's intra-op threads so runs on different machines are comparable."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Everything a reader needs to judge the numbers: CPU, threads, library versions."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **{
            name: version_of(name)
            for name in ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "httpx")
        },
    }


@contextmanager
def tiny_model() -> Iterator[tuple[Path, float]]:
    """The embedded tiny model built into a temp dir: (its folder, seconds to build)."""
    with tempfile.TemporaryDirectory(prefix="magicmix-bench-") as tmp:
        start = time.perf_counter()
        model_dir = build_random_model(Path(tmp) / "tiny", "tiny")
        yield model_dir, time.perf_counter() - start


# -- the report ---------------------------------------------------------------------------


def _load(load: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f}" if unit == "images/s" else f"{value:.3f}"


def markdown(sections: Sequence[Section], machine: dict[str, Any]) -> str:
    """One table row per figure, then each section's notes."""
    lines = [
        f"CPU benchmarks, tiny model: {machine['cpu_model']}, {machine['cpus_usable']} cores,"
        f" torch {machine['torch']} ({machine['torch_threads']} threads),"
        f" diffusers {machine['diffusers']}, {machine['device']} {machine['dtype']}",
        "",
        "| | case | unit | candidate | median | baseline | median | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for section in sections:
        for c in section.comparisons:
            met = "" if c.met is None else ("yes" if c.met else "**no**")
            lines.append(
                f"| {section.key} | {c.case} | {c.unit} | {c.label} | {_fmt(c.value, c.unit)}"
                f" | {c.baseline_label} | {_fmt(c.baseline, c.unit)} | {c.ratio:.3f}"
                f" | {c.target or ''} | {met} |"
            )
    lines.append("")
    for section in sections:
        lines.append(
            f"**({section.key}) {section.title}** — {section.seconds:.0f}s,"
            f" load {_load(section.load_before)} before, {_load(section.load_after)} after"
        )
        lines.extend(f"- {c.case}, {c.label}: {c.note}" for c in section.comparisons if c.note)
        lines.extend(f"- {note}" for note in section.notes)
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], table: str, out_dir: Path) -> Path:
    """`cpu-<date>.json` (every figure and sample) and `cpu-<date>.md` (the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{datetime.now(UTC):%Y-%m-%d}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(table + "\n")
    return path


Bench = Callable[[Context], Section]


def run_suite(benches: Sequence[Bench], argv: Sequence[str] | None, default_out: Path | None):
    """The command line of every entry point: build the model, run `benches`, report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256x256 only, fewer rounds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure")
    parser.add_argument(
        "--out", type=Path, default=default_out, help="write cpu-<date>.json and .md here"
    )
    args = parser.parse_args(argv)
    threads = configure_torch()
    print(f"torch threads: {threads} (torch.set_num_threads({TORCH_THREADS}))", flush=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    if load_start[0] > CONTENDED_LOAD:
        log(
            f"warning: load average {load_start[0]:.2f}: other processes are using these cores;"
            f" with {threads} torch threads, timings can be several times slower and noisy"
        )
    with tiny_model() as (model_dir, build_s), tempfile.TemporaryDirectory() as work:
        log(f"built the tiny model in {build_s:.2f}s; load average {load_start}")
        repeats = args.repeats or (1 if args.quick else 5)
        ctx = Context(model_dir, Path(work), quick=args.quick, repeats=repeats)
        sections = [bench(ctx) for bench in benches]
    machine = machine_info()
    total_s = time.perf_counter() - started
    load_end = os.getloadavg()
    table = markdown(sections, machine) + (
        f"Total {total_s:.0f}s; load average (1/5/15 min) {_load(load_start)} at start,"
        f" {_load(load_end)} at end.\n"
    )
    print(table, flush=True)
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "quick": args.quick,
        "repeats": repeats,
        "tiny_model_build_s": build_s,
        "total_seconds": total_s,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "sections": [s.to_json() for s in sections],
    }
    if args.out is not None:
        log(f"wrote {write_report(report, table, args.out)}")


def benchmark(key: str, title: str) -> Callable[[Callable[[Context, Section], None]], Bench]:
    """Decorator: time a benchmark body, record load before and after, return its section."""

    def wrap(body: Callable[[Context, Section], None]) -> Bench:
        def bench(ctx: Context) -> Section:
            result = Section(key, title, load_before=os.getloadavg())
            log(f"({key}) {title}")
            start = time.perf_counter()
            body(ctx, result)
            result.seconds = time.perf_counter() - start
            result.load_after = os.getloadavg()
            return result

        bench.__name__ = body.__name__
        bench.__doc__ = body.__doc__
        return bench

    return wrap
