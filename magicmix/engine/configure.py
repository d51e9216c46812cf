"""The engine as `MAGICMIX_*` settings describe it (model, device, dtype, fast path)."""

from __future__ import annotations

import torch

from magicmix.config import Settings
from magicmix.engine.loading import Components, load_components, resolve_dtype
from magicmix.engine.pipeline import EngineOptions, MagicMixEngine


def engine_options(settings: Settings) -> EngineOptions:
    """The fast-path switches that `MAGICMIX_*` controls."""
    return EngineOptions(
        compile=settings.compile,
        channels_last=settings.channels_last,
        batch_invariant=settings.batch_invariant,
    )


def load_engine(settings: Settings) -> MagicMixEngine:
    """Load the configured model onto the configured device, ready to mix."""
    return MagicMixEngine.load(
        settings.model,
        data_dir=settings.data_dir,
        device=settings.device,
        dtype=settings.dtype,
        text_cache_size=settings.text_cache_size,
        revision=settings.model_revision,
        options=engine_options(settings),
    )


def load_for_snapshot(settings: Settings, *, on_gpu: bool = False) -> Components:
    """The first half of a GPU container's cold start, kept in Modal's memory snapshot.

    Weights go to RAM in the dtype they will have on CUDA. No CUDA call may happen here
    (a memory snapshot is taken without a GPU), hence the explicit devices instead of
    `auto`; with Modal's GPU snapshot (`on_gpu`) the GPU is there and they go straight to it.
    """
    return load_components(
        settings.model,
        device=torch.device("cuda" if on_gpu else "cpu"),
        dtype=resolve_dtype(settings.dtype, torch.device("cuda")),
        revision=settings.model_revision,
    )


def engine_on_cuda(components: Components, settings: Settings) -> MagicMixEngine:
    """After each restore: move the weights to the GPU, wrap them, compile if asked.

    With `MAGICMIX_COMPILE`, every batch bucket up to the batch size is compiled now,
    before the container takes work, so no request pays for it.
    """
    device = torch.device("cuda")
    for module in components.modules():
        module.to(device)
    engine = MagicMixEngine(
        components,
        device=device,
        dtype=resolve_dtype(settings.dtype, device),
        text_cache_size=settings.text_cache_size,
        options=engine_options(settings),
    )
    engine.model_name = settings.model
    if settings.model_family not in ("auto", engine.family):
        raise RuntimeError(
            f"MAGICMIX_MODEL_FAMILY is {settings.model_family} but {settings.model} is"
            f" {engine.family}: redeploy with the right family (or none, to detect it)"
        )
    if settings.compile:
        sizes = [b for b in engine.options.batch_buckets if b <= settings.batch_size]
        engine.warmup(768, 768, batch_sizes=sizes)
    return engine
