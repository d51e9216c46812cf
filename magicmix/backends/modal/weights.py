"""Weights into the Volume: the files of a hub checkpoint that MagicMix reads, and no more."""

from __future__ import annotations

import logging

from huggingface_hub import snapshot_download

from magicmix.config import Settings

log = logging.getLogger(__name__)

# Everything else in a repo (safety checker, full-precision and .ckpt weights, EMA copies)
# is never downloaded.
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    # SDXL's second text encoder (absent from SD 1.x repos, so asked for in vain there)
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "tokenizer_2/*",
]


def download_weights(settings: Settings) -> str:
    """Fill the Hugging Face cache (the Volume) for `MAGICMIX_MODEL` at its revision."""
    path = snapshot_download(
        settings.model, revision=settings.model_revision, allow_patterns=HUB_ALLOW_PATTERNS
    )
    log.info("cached %s@%s in %s", settings.model, settings.model_revision or "main", path)
    return str(path)
