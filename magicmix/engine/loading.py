"""Find and load the Stable Diffusion 1.x components the engine runs on.

`MAGICMIX_MODEL` names the model: `tiny` (built offline into the data dir on first use),
a local diffusers directory, or a Hugging Face hub id (read from the local HF cache when
`HF_HUB_OFFLINE=1`, as on Modal where a Volume holds the cache).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)

TINY = "tiny"
# from_pretrained builds modules under a process-wide patch of torch.nn (meta-device init),
# so two loads in two threads (a reload beside a start) corrupt each other: one at a time.
_LOAD_LOCK = threading.Lock()


@dataclass
class Components:
    """The five pieces of an SD 1.x checkpoint that MagicMix uses (no safety checker)."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("MAGICMIX_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA (SD 1.x was trained for it) and fp32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def resolve_model_source(model: str, data_dir: Path) -> str:
    """Turn `MAGICMIX_MODEL` into something `from_pretrained` takes, building `tiny` if needed."""
    if model == TINY:
        tiny_dir = data_dir / "tiny-model"
        if not (tiny_dir / "model_index.json").exists():
            from magicmix.engine.builder import build_random_model  # only needed once

            log.info("building the embedded tiny model into %s", tiny_dir)
            build_random_model(tiny_dir, "tiny")
        return str(tiny_dir)
    return model


def load_components(
    source: str, *, device: torch.device, dtype: torch.dtype, revision: str | None = None
) -> Components:
    """Load each component once, in `dtype` on `device`; fp16 files are preferred when asked.

    `revision` pins a hub checkpoint to a commit, so a redeploy never picks up new weights.
    """
    with _LOAD_LOCK:
        variant = "fp16" if dtype == torch.float16 and not Path(source).is_dir() else None
        common = {"torch_dtype": dtype, "variant": variant, "use_safetensors": True}
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", revision=revision, **common
        )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, **common)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", revision=revision, **common
        )
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        # MagicMix is defined with a deterministic sampler; DDIM reads the checkpoint's own
        # noise schedule from its scheduler config, whatever scheduler class it names.
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return Components(vae, text_encoder, tokenizer, unet, scheduler)
