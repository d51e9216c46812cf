"""Speed and memory of the MagicMix engine on full-size SD 1.5 (random weights), plain vs fast.

What is measured, and why:

- The seed example of the service: a 768x768 layout image, steps 20, kmin 0.3, kmax 0.5,
  mix_factor 0.5, guidance 7.5 (10 UNet calls on a classifier-free-guidance batch of 2B),
  at batch 1, 4 and 8. Each timed run goes end to end through `MagicMixEngine.mix`: image
  resize and VAE encode, text encoding (every run uses fresh prompts, so the text cache
  never hides the CLIP cost), CPU-seeded noise, the DDIM loop, VAE decode and PIL
  conversion. Host timers sit between `torch.cuda.synchronize()` calls.
- Three engine configurations, built fresh one after another in one process, so they
  share the card, drivers and clocks:
    plain  float32, classic attention, no TF32, no channels_last, no compile (the baseline);
    fp16   float16 + PyTorch SDPA attention + TF32;
    fast   float16 + SDPA + channels_last + TF32 + torch.compile (UNet and VAE decoder),
           warmed up with `engine.warmup` per batch size; compile seconds are reported apart.
- Per (configuration, size, batch) cell: one untimed warm run, then as many timed runs as
  the cell's time budget allows (at most --repeats); p50/p95 seconds per image, images/s
  (batch / p50 run time) and peak GPU memory (`torch.cuda.max_memory_allocated`, reset
  after the warm run, so it is steady state: weights + activations of that cell alone).
- The UNet alone, one guided step at batch 1 (a UNet batch of 2), per configuration.
- Targets, checked at 768x768: p50 <= 0.4 s per image at batch 1, >= 8 images/s at batch 8,
  peak memory <= 8 GiB at batch 1.

The model is SD 1.5's exact architecture (UNet 860M, VAE 84M, CLIP-L text tower 123M) with
random weights, built in memory on the device (no hub, no disk): speed and memory do not
depend on the weights' values. If half precision ever overflows, the engine silently redoes
the VAE in float32; the `vae_fp32_fallback` flag reports it, since it would distort timings.

Results are written to OUT/gpu_bench.json (every figure, the machine, the versions) and
OUT/table.md after every cell, so a run cut short still leaves what it measured. A global
time budget (--budget-s) skips what would not fit and says so.

    python3 benchmarks/gpu.py --out DIR                      # the GPU run (about 6 minutes)
    python benchmarks/gpu.py --arch tiny --device cpu --sizes 256 --batches 1,2 --repeats 2 \
        --out /tmp/bench                                     # a CPU dry run of every path
    python3 benchmarks/gpu.py --arch sdxl --sizes 1024 --batches 1,4 --out DIR
                                                             # SDXL base at 1024 (issue 16)
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from magicmix.engine import EngineOptions, MagicMixEngine  # noqa: E402
from magicmix.engine.builder import (  # noqa: E402
    ARCH_FAMILY,
    BUILD_SEED,
    _sd15_modules,
    _sdxl_modules,
    _tiny_modules,
    _tiny_sdxl_modules,
    build_clip_tokenizer,
    sd_scheduler,
)
from magicmix.engine.loading import Components  # noqa: E402
from magicmix.request import MixRequest  # noqa: E402

GIB = 2**30
TARGET_SIZE = 768
TARGET_B1_SECONDS = 0.4  # p50 seconds per image at batch 1
TARGET_B8_IMAGES_PER_S = 8.0
TARGET_B1_PEAK_GIB = 8.0
SEED_EXAMPLE = {
    "steps": 20,
    "kmin": 0.3,
    "kmax": 0.5,
    "mix_factor": 0.5,
    "guidance_scale": 7.5,
}


@dataclass(frozen=True)
class ConfigSpec:
    name: str
    dtype: torch.dtype
    options: EngineOptions
    cell_budget_s: float  # timed runs per cell stop once this much time would be spent
    slice_s: float | None  # the most this configuration may take; None: what is left


CONFIGS: tuple[ConfigSpec, ...] = (
    ConfigSpec(
        "plain",
        torch.float32,
        EngineOptions(sdpa=False, channels_last=False, tf32=False, compile=False),
        cell_budget_s=14.0,
        slice_s=80.0,
    ),
    ConfigSpec(
        "fp16",
        torch.float16,
        EngineOptions(sdpa=True, channels_last=False, tf32=True, compile=False),
        cell_budget_s=8.0,
        slice_s=50.0,
    ),
    ConfigSpec(
        "fast",
        torch.float16,
        EngineOptions(sdpa=True, channels_last=True, tf32=True, compile=True),
        cell_budget_s=8.0,
        slice_s=None,
    ),
    ConfigSpec(
        "fastfused",
        torch.float16,
        EngineOptions(sdpa=True, channels_last=True, tf32=True, compile=True, fuse_qkv=True),
        cell_budget_s=8.0,
        slice_s=None,
    ),
    # issue 17, each change alone on top of `fast`: CUDA graphs for the UNet loop, and
    # host-to-GPU copies from pinned memory
    ConfigSpec(
        "fastgraphs",
        torch.float16,
        EngineOptions(sdpa=True, channels_last=True, tf32=True, compile=True, cuda_graphs=True),
        cell_budget_s=8.0,
        slice_s=None,
    ),
    ConfigSpec(
        "fastpinned",
        torch.float16,
        EngineOptions(
            sdpa=True, channels_last=True, tf32=True, compile=True, pinned_transfers=True
        ),
        cell_budget_s=8.0,
        slice_s=None,
    ),
)


@dataclass
class Cell:
    config: str
    dtype: str
    size: int
    batch: int
    status: str = "pending"  # ok | skipped | oom | error
    note: str = ""
    warm_s: float | None = None
    runs_s: list[float] = field(default_factory=list)
    p50_s_per_image: float | None = None
    p95_s_per_image: float | None = None
    images_per_s: float | None = None
    peak_bytes: int | None = None
    unet_calls_per_run: float | None = None
    graphs_compiled: int | None = None  # torch.compile graphs made during this cell's runs

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / GIB


@dataclass
class ConfigResult:
    name: str
    dtype: str
    options: dict[str, Any]
    status: str = "pending"
    note: str = ""
    build_s: float | None = None
    build_path: str = ""
    weights_bytes: int | None = None
    compile_s: dict[str, float] = field(default_factory=dict)  # batch -> warmup seconds
    unet_step_s: float | None = None  # one guided UNet step, batch 1 (UNet batch 2)
    unet_step_iters: int = 0
    vae_fp32_fallback: bool = False
    error: str = ""
    cells: list[Cell] = field(default_factory=list)


class Clock:
    """A deadline: the run's global one, or a configuration's slice of it."""

    def __init__(self, budget_s: float, parent: Clock | None = None) -> None:
        self.start = parent.start if parent else time.perf_counter()
        self.deadline = time.perf_counter() + budget_s
        if parent:
            self.deadline = min(self.deadline, parent.deadline)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# -- environment ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": version_of("diffusers"),
        "transformers": version_of("transformers"),
        "huggingface_hub": version_of("huggingface_hub"),
        "safetensors": version_of("safetensors"),
        "triton": version_of("triton"),
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            total_memory_gib=round(props.total_memory / GIB, 2),
            multiprocessors=props.multi_processor_count,
        )
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    else:
        info["card"] = platform.processor() or "cpu"
    return info


# -- model and inputs -------------------------------------------------------------------


def build_components(
    arch: str, device: torch.device, dtype: torch.dtype
) -> tuple[Components, float, str]:
    """SD 1.x modules with random weights, made directly on `device` (no disk, no hub).

    Construction under `torch.device(device)` initialises the weights on the GPU in
    seconds; if a library refuses that, the modules are built on the CPU and moved.
    """
    start = time.perf_counter()
    tokenizer = build_clip_tokenizer()

    def make() -> tuple[torch.nn.Module, ...]:
        torch.manual_seed(BUILD_SEED)
        if arch == "sd15":
            return _sd15_modules()
        if arch == "sdxl":
            return _sdxl_modules()
        if arch == "tiny-sdxl":
            return _tiny_sdxl_modules(len(tokenizer))
        return _tiny_modules(vocab_size=len(tokenizer))

    path = f"built on {device}"
    try:
        with torch.device(device):
            modules = make()
    except Exception as exc:
        path = f"built on cpu, moved to {device} ({type(exc).__name__}: {exc})"
        modules = make()
    for module in modules:
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    unet, vae, *text_encoders = modules
    family = ARCH_FAMILY[arch]
    components = Components(
        family=family,
        vae=vae,  # type: ignore[arg-type]
        denoiser=unet,  # type: ignore[arg-type]
        scheduler=sd_scheduler(),
        text_encoders=tuple(text_encoders),  # type: ignore[arg-type]
        tokenizers=(tokenizer, *(build_clip_tokenizer() for _ in text_encoders[1:])),
        zeros_for_empty_prompt=family.zeros_for_empty_prompt,
    )
    sync(device)
    return components, time.perf_counter() - start, path


def layout_image(size: int) -> Image.Image:
    """A deterministic synthetic layout: colour gradients with a bright disc and a bar."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    red = x
    green = y
    blue = 1.0 - (x + y) / 2
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2) < 0.04
    bar = (np.abs(y - 0.75) < 0.05) & (x > 0.5)
    rgb = np.stack([red, green, blue], axis=-1)
    rgb[disc] = (1.0, 0.95, 0.8)
    rgb[bar] = (0.1, 0.1, 0.15)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def make_requests(image: Image.Image, size: int, batch: int, run: int) -> list[MixRequest]:
    """The seed example; prompts are new every run so text encoding is always paid for."""
    return [
        MixRequest(
            image=image,
            prompt=f"a watercolor painting of a red fox, run {run}, sample {i}",
            negative_prompt="blurry, low quality",
            width=size,
            height=size,
            seed=1234 + i,
            **SEED_EXAMPLE,  # type: ignore[arg-type]
        )
        for i in range(batch)
    ]


# -- measuring --------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compiled_graphs() -> int:
    """Graphs torch.compile has made so far (a dynamo counter; 0 if it is not there)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def measure_cell(
    engine: MagicMixEngine,
    cell: Cell,
    image: Image.Image,
    *,
    max_repeats: int,
    cell_budget_s: float,
    clock: Clock,
    estimate_s: float,
) -> None:
    """One warm run, then timed runs within the cell's budget and the global deadline."""
    device = engine.device
    if estimate_s > 0 and clock.left() < estimate_s:
        cell.status = "skipped"
        cell.note = f"time budget: ~{estimate_s:.0f}s needed, {max(clock.left(), 0):.0f}s left"
        return
    graphs_before = compiled_graphs()
    try:
        warm = make_requests(image, cell.size, cell.batch, 0)
        cell.warm_s = timed(lambda: engine.mix(warm, progress=False), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        repeats = max(1, min(max_repeats, math.floor(cell_budget_s / cell.warm_s)))
        repeats = min(repeats, math.floor(clock.left() / cell.warm_s))
        if repeats < 1:
            cell.status = "skipped"
            cell.note = f"time budget: warm run took {cell.warm_s:.1f}s, no time for timed runs"
            return
        calls_before = engine.unet_calls
        for run in range(1, repeats + 1):
            requests = make_requests(image, cell.size, cell.batch, run)
            cell.runs_s.append(timed(lambda r=requests: engine.mix(r, progress=False), device))
        cell.unet_calls_per_run = (engine.unet_calls - calls_before) / repeats
        if engine.options.compile:
            cell.graphs_compiled = compiled_graphs() - graphs_before
            if cell.graphs_compiled:
                cell.note = f"{cell.graphs_compiled} graph(s) compiled after warmup"
        if device.type == "cuda":
            cell.peak_bytes = torch.cuda.max_memory_allocated(device)
        per_image = np.asarray(cell.runs_s) / cell.batch
        cell.p50_s_per_image = float(np.percentile(per_image, 50))
        cell.p95_s_per_image = float(np.percentile(per_image, 95))
        cell.images_per_s = cell.batch / float(np.percentile(cell.runs_s, 50))
        cell.status = "ok"
        if repeats < max_repeats:
            budget_note = f"{repeats} timed runs (budget {cell_budget_s:.0f}s)"
            cell.note = f"{cell.note}; {budget_note}" if cell.note else budget_note
    except torch.OutOfMemoryError as exc:
        cell.status = "oom"
        cell.note = short_error(exc)[:120]
    except Exception as exc:
        cell.status = "error"
        cell.note = short_error(exc)
        traceback.print_exc()
    finally:
        release(device)


@torch.inference_mode()
def unet_step_seconds(engine: MagicMixEngine, size: int, budget_s: float) -> tuple[float, int]:
    """One guided UNet step at batch 1, shaped exactly as the engine calls it."""
    device, dtype = engine.device, engine.dtype
    unet = engine.components.denoiser
    side = size // engine.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, engine.latent_channels, side, side, generator=generator)
    model_input = torch.cat([latents, latents]).to(device=device, dtype=dtype)
    if engine.options.channels_last:
        model_input = model_input.contiguous(memory_format=torch.channels_last)
    width = unet.config.cross_attention_dim
    text = torch.randn(2, 77, width, generator=generator).to(device=device, dtype=dtype)
    t = torch.tensor(501, dtype=torch.int64)  # a 0-d CPU tensor, as the scheduler yields
    extra: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * (
            unet.config.addition_time_embed_dim
        )
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2).to(device, dtype),
        }

    def step() -> None:
        unet(model_input, t, encoder_hidden_states=text, **extra)

    first = timed(step, device)
    for _ in range(2):
        step()
    once = min(first, timed(step, device))
    iters = max(3, min(50, math.floor(budget_s / max(once, 1e-6))))
    total = timed(lambda: [step() for _ in range(iters)], device)
    return total / iters, iters


def run_cells(
    engine: MagicMixEngine,
    spec: ConfigSpec,
    result: ConfigResult,
    args: argparse.Namespace,
    clock: Clock,
    save: Callable[[], None],
) -> None:
    """Every (size, batch) cell of one configuration, compiling per batch when asked.

    `clock` is the configuration's slice of the run's time; a cell that would not fit in
    what is left of it is skipped (and says so) rather than overrunning the whole run.
    """
    device = engine.device
    budget = spec.cell_budget_s * args.budget_scale
    image_for = {size: layout_image(size) for size in args.sizes}
    last: dict[int, tuple[int, float]] = {}  # size -> (batch, run seconds) of the last cell
    last_compile = 0.0
    order = list(result.cells)
    if engine.options.compile:
        # Each batch size is its own compile; should time run short, the smallest and the
        # largest batch (the latency and the throughput targets) come first.
        low, high = min(args.batches), max(args.batches)
        order.sort(key=lambda c: (c.size, c.batch not in (low, high), -(c.batch == low)))
    for cell in order:
        estimate = 0.0
        if cell.size in last:
            prev_batch, prev_s = last[cell.size]
            estimate = prev_s * max(1.0, cell.batch / prev_batch)
        if engine.options.compile:
            key = f"{cell.size}x{cell.size}/b{cell.batch}"
            needed = estimate + (last_compile or 60.0)
            if result.compile_s and clock.left() < needed:
                cell.status = "skipped"
                cell.note = f"time budget: ~{needed:.0f}s to compile+run, {clock.left():.0f}s left"
                save()
                continue
            try:
                seconds = timed(
                    lambda c=cell: engine.warmup(c.size, c.size, batch_sizes=[c.batch]), device
                )
            except Exception as exc:
                traceback.print_exc()
                cell.status, cell.note = "error", f"warmup/compile: {short_error(exc)}"
                result.error = result.error or cell.note
                release(device)
                save()
                continue
            result.compile_s[key] = seconds
            last_compile = seconds
            print(f"[{spec.name}] warmup/compile {key}: {seconds:.1f}s", flush=True)
        measure_cell(
            engine,
            cell,
            image_for[cell.size],
            max_repeats=args.repeats,
            cell_budget_s=budget,
            clock=clock,
            estimate_s=estimate,
        )
        if cell.runs_s:
            last[cell.size] = (cell.batch, float(np.median(cell.runs_s)))
        elif cell.warm_s is not None:
            last[cell.size] = (cell.batch, cell.warm_s)
        print(f"[{spec.name}] {describe_cell(cell)}  (t={clock.elapsed():.0f}s)", flush=True)
        save()
        if cell.batch == min(args.batches) and cell.status == "ok" and clock.left() > 10:
            try:
                result.unet_step_s, result.unet_step_iters = unet_step_seconds(
                    engine, cell.size, budget_s=min(3.0, budget / 2)
                )
                print(
                    f"[{spec.name}] UNet step b{cell.batch} {cell.size}px: "
                    f"{result.unet_step_s * 1e3:.1f} ms ({result.unet_step_iters} iters)",
                    flush=True,
                )
            except Exception as exc:
                traceback.print_exc()
                result.error = result.error or f"unet step: {short_error(exc)}"
                release(device)


def run_config(
    spec: ConfigSpec,
    args: argparse.Namespace,
    device: torch.device,
    clock: Clock,
    save: Callable[[], None],
    result: ConfigResult,
) -> None:
    """Build a fresh model for `spec`, measure its cells, record failures, free the GPU."""
    dtype = spec.dtype if device.type == "cuda" else torch.float32
    result.dtype = str(dtype).removeprefix("torch.")
    if dtype != spec.dtype:
        result.note = f"asks for {spec.dtype}, run as {dtype} on {device.type}"
    options = spec.options
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if options.compile and not compile_on:
        options = EngineOptions(**{**asdict(options), "compile": False})
        reason = "--compile off" if args.compile == "off" else "--compile auto on the cpu"
        result.note = (result.note + "; " if result.note else "") + f"compile skipped ({reason})"
        result.options = asdict(options)
    result.cells = [
        Cell(spec.name, result.dtype, size, batch) for size in args.sizes for batch in args.batches
    ]
    if clock.left() < 20:
        result.status = "skipped"
        result.note = "global budget spent before this configuration"
        for cell in result.cells:
            cell.status, cell.note = "skipped", "global budget"
        return
    local = Clock(spec.slice_s, parent=clock) if spec.slice_s else clock
    engine: MagicMixEngine | None = None
    try:
        components, result.build_s, result.build_path = build_components(args.arch, device, dtype)
        engine = MagicMixEngine(components, device=device, dtype=dtype, options=options)
        del components
        if device.type == "cuda":
            result.weights_bytes = torch.cuda.memory_allocated(device)
        print(f"[{spec.name}] built in {result.build_s:.1f}s ({result.build_path})", flush=True)
        run_cells(engine, spec, result, args, local, save)
        result.vae_fp32_fallback = engine._vae_fp32 is not None
        statuses = {c.status for c in result.cells}
        if statuses == {"ok"} or statuses == {"skipped"}:
            result.status = statuses.pop()
        else:
            result.status = "partial" if "ok" in statuses else "failed"
    except Exception as exc:
        traceback.print_exc()
        result.status = "failed"
        result.error = short_error(exc)
        for cell in result.cells:
            if cell.status == "pending":
                cell.status, cell.note = "error", "configuration failed"
    finally:
        engine = None
        if options.compile:
            torch._dynamo.reset()
        release(device)
        save()


# -- reporting --------------------------------------------------------------------------


def describe_cell(cell: Cell) -> str:
    head = f"{cell.size}px b{cell.batch}: {cell.status}"
    if cell.status != "ok":
        return f"{head} {cell.note}"
    peak = f"{cell.peak_gib:.2f} GiB" if cell.peak_gib is not None else "n/a"
    return (
        f"{head} p50 {cell.p50_s_per_image:.3f} s/img, p95 {cell.p95_s_per_image:.3f} s/img, "
        f"{cell.images_per_s:.2f} img/s, peak {peak}, n={len(cell.runs_s)}, "
        f"warm {cell.warm_s:.2f}s"
    )


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def find_cell(result: ConfigResult, size: int, batch: int) -> Cell | None:
    return next((c for c in result.cells if c.size == size and c.batch == batch), None)


def targets(result: ConfigResult) -> dict[str, str]:
    """PASS/FAIL per target at 768x768 ('n/a' where that cell was not measured)."""

    def check(
        cell: Cell | None, value: Callable[[Cell], float | None], ok: Callable[[float], bool]
    ):
        if cell is None or cell.status != "ok":
            return "n/a"
        measured = value(cell)
        if measured is None:
            return "n/a"
        return f"{'PASS' if ok(measured) else 'FAIL'} ({measured:.3g})"

    b1 = find_cell(result, TARGET_SIZE, 1)
    b8 = find_cell(result, TARGET_SIZE, 8)
    return {
        f"b1 p50 <= {TARGET_B1_SECONDS} s/img": check(
            b1, lambda c: c.p50_s_per_image, lambda v: v <= TARGET_B1_SECONDS
        ),
        f"b8 >= {TARGET_B8_IMAGES_PER_S:g} img/s": check(
            b8, lambda c: c.images_per_s, lambda v: v >= TARGET_B8_IMAGES_PER_S
        ),
        f"b1 peak <= {TARGET_B1_PEAK_GIB:g} GiB": check(
            b1, lambda c: c.peak_gib, lambda v: v <= TARGET_B1_PEAK_GIB
        ),
    }


def markdown(info: dict[str, Any], results: list[ConfigResult], args: argparse.Namespace) -> str:
    lines = [
        f"### MagicMix engine, {args.arch} random weights, on {info.get('card')} "
        f"(torch {info['torch']}, diffusers {info['diffusers']})",
        "",
        "seed example: steps 20, kmin 0.3, kmax 0.5 (10 UNet calls), mix 0.5, guidance 7.5; "
        "end to end through engine.mix",
        "",
        "| config | dtype | size | batch | n | p50 s/img | p95 s/img | img/s | peak GiB "
        "| x plain | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = next((r for r in results if r.name == "plain"), None)
    for result in results:
        for cell in result.cells:
            base = find_cell(plain, cell.size, cell.batch) if plain else None
            speedup = (
                f"{base.p50_s_per_image / cell.p50_s_per_image:.2f}"
                if base
                and base.p50_s_per_image
                and cell.p50_s_per_image
                and cell.status == "ok"
                and base.status == "ok"
                else "-"
            )
            note = cell.note if cell.status == "ok" else f"{cell.status}: {cell.note}"
            lines.append(
                f"| {result.name} | {cell.dtype} | {cell.size} | {cell.batch} | {len(cell.runs_s)} "
                f"| {fmt(cell.p50_s_per_image, '.3f')} | {fmt(cell.p95_s_per_image, '.3f')} "
                f"| {fmt(cell.images_per_s, '.2f')} | {fmt(cell.peak_gib, '.2f')} | {speedup} "
                f"| {note.replace('|', '/')} |"
            )
    if not results:
        return "\n".join(lines)
    target_names = list(targets(results[0]))
    lines += [
        "",
        "| config | build s | weights GiB | compile s | UNet step b1 ms | VAE fp32 fallback "
        "| status | " + " | ".join(target_names) + " |",
        "|" + "---|" * (6 + len(target_names)),
    ]
    for result in results:
        compile_total = sum(result.compile_s.values()) if result.compile_s else None
        weights = None if result.weights_bytes is None else result.weights_bytes / GIB
        step_ms = None if result.unet_step_s is None else result.unet_step_s * 1e3
        status = result.status + (f" ({result.error})" if result.error else "")
        lines.append(
            f"| {result.name} | {fmt(result.build_s, '.1f')} | {fmt(weights, '.2f')} "
            f"| {fmt(compile_total, '.1f')} | {fmt(step_ms, '.1f')} "
            f"| {'YES' if result.vae_fp32_fallback else 'no'} | {status.replace('|', '/')} | "
            + " | ".join(targets(result).values())
            + " |"
        )
    notes = [f"{r.name}: {r.note}" for r in results if r.note]
    if notes:
        lines += ["", "notes: " + "; ".join(notes)]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and table")
    parser.add_argument("--arch", choices=("sd15", "tiny", "sdxl", "tiny-sdxl"), default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default=str(TARGET_SIZE), help="comma-separated, e.g. 768")
    parser.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=15, help="most timed runs per cell")
    parser.add_argument(
        "--configs", default=",".join(c.name for c in CONFIGS), help="subset, in order"
    )
    parser.add_argument("--budget-s", type=float, default=360.0, help="global time budget")
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="scales every per-cell time budget"
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile for 'fast' (auto: on CUDA only; on the CPU it takes minutes)",
    )
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.batches = sorted({int(b) for b in args.batches.split(",") if b})
    known = {c.name: c for c in CONFIGS}
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(known)}")
    args.configs = [known[n] for n in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # "modules kept in float32: []" noise
    clock = Clock(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a dry run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    print(json.dumps(info, indent=1), flush=True)
    results: list[ConfigResult] = []

    def save() -> None:
        payload = {
            "machine": info,
            "arch": args.arch,
            "request": {"sizes": args.sizes, "batches": args.batches, **SEED_EXAMPLE},
            "args": {
                k: (v if k != "configs" else [c.name for c in v]) for k, v in vars(args).items()
            },
            "elapsed_s": clock.elapsed(),
            "configs": [
                {
                    **asdict(r),
                    "targets": targets(r),
                    "cells": [{**asdict(c), "peak_gib": c.peak_gib} for c in r.cells],
                }
                for r in results
            ],
        }
        (args.out / "gpu_bench.json").write_text(json.dumps(payload, indent=1, default=str))
        (args.out / "table.md").write_text(markdown(info, results, args) + "\n")

    for spec in args.configs:
        result = ConfigResult(spec.name, "", asdict(spec.options))
        results.append(result)
        print(f"\n== {spec.name}: {result.options} (t={clock.elapsed():.0f}s)", flush=True)
        run_config(spec, args, device, clock, save, result)
    save()
    print(f"\ntotal {clock.elapsed():.0f}s; JSON: {args.out / 'gpu_bench.json'}\n")
    print(markdown(info, results, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
