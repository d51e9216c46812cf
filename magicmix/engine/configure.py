"""The engine as `MAGICMIX_*` settings describe it (model, device, dtype, fast path).

With `MAGICMIX_COMPILE`, the engine is warmed up when it loads (locally and on Modal alike):
every batch bucket up to the batch size is compiled for each `MAGICMIX_COMPILE_SIZES`, with
the compile cache (`compile_cache.py`) loaded first and saved after a miss.
"""

from __future__ import annotations

import logging
import time

import torch

from magicmix.config import Settings
from magicmix.engine.compile_cache import CompileCache, CompileKey, device_label, model_label
from magicmix.engine.loading import (
    Components,
    load_components,
    resolve_dtype,
    resolve_model_source,
)
from magicmix.engine.pipeline import EngineOptions, MagicMixEngine

log = logging.getLogger(__name__)


def engine_options(settings: Settings) -> EngineOptions:
    """The fast-path switches that `MAGICMIX_*` controls."""
    return EngineOptions(
        compile=settings.compile,
        channels_last=settings.channels_last,
        batch_invariant=settings.batch_invariant,
        cuda_graphs=settings.cuda_graphs,
        pinned_transfers=settings.pinned_transfers,
    )


def warm_up(engine: MagicMixEngine, settings: Settings) -> dict[str, float]:
    """Compile now, before the engine takes work: from the cache when it has the graphs.

    Returns seconds spent: loading the cache, compiling (or re-tracing from it), saving.
    """
    if not engine.options.compile:
        return {}
    sizes = settings.compile_sizes or ((engine.family.native_size,) * 2,)
    buckets = tuple(b for b in engine.options.batch_buckets if b <= settings.batch_size)
    key = CompileKey(
        torch_version=torch.__version__,
        device=device_label(engine.device),
        model=model_label(engine.source, settings.model_revision),
        dtype=str(engine.dtype),
        sizes=tuple(sizes),
        buckets=buckets,
        options=repr(engine.options),
    )
    cache = CompileCache(settings.compile_cache_path, settings.compile_work_dir)
    started = time.perf_counter()
    hit = cache.activate(key)
    loaded = time.perf_counter()
    for width, height in sizes:
        engine.warmup(width, height, batch_sizes=buckets)
    compiled = time.perf_counter()
    if not hit:
        cache.publish(key)
    timings = {
        "cache_load_s": loaded - started,
        "compile_s": compiled - loaded,
        "cache_save_s": time.perf_counter() - compiled,
        "cache_hit": float(hit),
    }
    log.info("warm-up %s: %s", "from the compile cache" if hit else "from scratch", timings)
    return timings


def load_engine(settings: Settings) -> MagicMixEngine:
    """Load the configured model onto the configured device, warmed up, ready to mix."""
    engine = MagicMixEngine.load(
        settings.model,
        data_dir=settings.data_dir,
        device=settings.device,
        dtype=settings.dtype,
        text_cache_size=settings.text_cache_size,
        revision=settings.model_revision,
        options=engine_options(settings),
    )
    warm_up(engine, settings)
    return engine


def load_for_snapshot(settings: Settings, *, on_gpu: bool = False) -> Components:
    """The first half of a GPU container's cold start, kept in Modal's memory snapshot.

    Weights go to RAM in the dtype they will have on CUDA. No CUDA call may happen here
    (a memory snapshot is taken without a GPU), hence the explicit devices instead of
    `auto`; with Modal's GPU snapshot (`on_gpu`) the GPU is there and they go straight to it.
    """
    return load_components(
        resolve_model_source(settings.model, settings.data_dir),  # `toy` and `tiny` too
        device=torch.device("cuda" if on_gpu else "cpu"),
        dtype=resolve_dtype(settings.dtype, torch.device("cuda")),
        revision=settings.model_revision,
    )


def engine_on_device(components: Components, settings: Settings) -> MagicMixEngine:
    """After each restore: move the weights to the GPU, wrap them, compile if asked.

    With `MAGICMIX_COMPILE`, every batch bucket up to the batch size is compiled now,
    before the container takes work, so no request pays for it. `MAGICMIX_DEVICE=cpu`
    keeps them on the CPU: the local rehearsal of the Modal app runs this same path.
    """
    device = torch.device("cpu" if settings.device == "cpu" else "cuda")
    for module in components.modules():
        module.to(device)
    engine = MagicMixEngine(
        components,
        device=device,
        dtype=resolve_dtype(settings.dtype, device),
        text_cache_size=settings.text_cache_size,
        options=engine_options(settings),
    )
    engine.model_name = engine.source = settings.model
    if settings.model_family not in ("auto", engine.family.name):
        raise RuntimeError(
            f"MAGICMIX_MODEL_FAMILY is {settings.model_family} but {settings.model} is"
            f" {engine.family.name}: redeploy with the right family (or none, to detect it)"
        )
    warm_up(engine, settings)
    return engine
