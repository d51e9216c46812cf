"""Find and load the Stable Diffusion components the engine runs on (SD 1.x or SDXL).

`MAGICMIX_MODEL` names the model: `toy` (trained, shipped in the package, hash-checked),
`tiny` (random weights, built offline into the data dir on first use), a local diffusers
directory, or a Hugging Face hub id (read from the local HF cache when
`HF_HUB_OFFLINE=1`, as on Modal where a Volume holds the cache).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from magicmix.engine.toy import verified_model_dir
from magicmix.families import TINY, TOY, Family, family_of

log = logging.getLogger(__name__)

# from_pretrained builds modules under a process-wide patch of torch.nn (meta-device init),
# so two loads in two threads (a reload beside a start) corrupt each other: one at a time.
_LOAD_LOCK = threading.Lock()


@dataclass
class Components:
    """The pieces of a checkpoint that MagicMix uses (no safety checker); SDXL has two
    text encoders and tokenizers."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def family(self) -> Family:
        return "sdxl" if self.text_encoder_2 is not None else "sd1"

    def modules(self) -> list[torch.nn.Module]:
        """The weights: what moves between devices."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m]


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA, else Apple's GPU (MPS), else the CPU; an absent one is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (device == "cuda" and not cuda) or (device == "mps" and not mps):
        raise RuntimeError(f"MAGICMIX_DEVICE={device} but no {device.upper()} device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (SD was trained for it); fp32 elsewhere, MPS included, as
    diffusers documents for Apple silicon (its fp16 kernels are not all numerically safe)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def resolve_model_source(model: str, data_dir: Path) -> str:
    """Turn `MAGICMIX_MODEL` into something `from_pretrained` takes, building `tiny` if needed."""
    if model == TOY:
        return str(verified_model_dir())
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
        index = DiffusionPipeline.load_config(source, revision=revision)
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
        second: dict[str, object] = {}
        if family_of(index) == "sdxl":
            second = {
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", revision=revision, **common
                ),
                "tokenizer_2": CLIPTokenizer.from_pretrained(
                    source, subfolder="tokenizer_2", revision=revision
                ),
                "force_zeros_for_empty_prompt": bool(
                    index.get("force_zeros_for_empty_prompt", True)
                ),
            }
    components = Components(vae, text_encoder, tokenizer, unet, scheduler, **second)  # type: ignore[arg-type]
    for module in components.modules():
        module.to(device).eval().requires_grad_(False)
    return components
