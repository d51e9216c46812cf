"""Find and load the components the engine runs on, as the checkpoint's family names them.

`MAGICMIX_MODEL` names the model: `toy` (trained, shipped in the package, hash-checked),
`tiny` (random weights, built offline into the data dir on first use), a local diffusers
directory, or a Hugging Face hub id (read from the local HF cache when
`HF_HUB_OFFLINE=1`, as on Modal where a Volume holds the cache).
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ModelMixin
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from magicmix.engine.toy import verified_model_dir
from magicmix.families import FAMILIES, TINY, TOY, ModelFamily, family_of, listed_components

log = logging.getLogger(__name__)

# from_pretrained builds modules under a process-wide patch of torch.nn (meta-device init),
# so two loads in two threads (a reload beside a start) corrupt each other: one at a time.
_LOAD_LOCK = threading.Lock()
# the libraries a checkpoint's model_index.json may name classes from
LIBRARIES = ("diffusers", "transformers")


@dataclass
class Components:
    """The pieces of a checkpoint that MagicMix runs (no safety checker), as its family
    names them: the text encoders and tokenizers in `family.text_encoders`' order."""

    family: ModelFamily
    vae: AutoencoderKL
    denoiser: ModelMixin  # SD 1.x and SDXL: a UNet2DConditionModel
    scheduler: DDIMScheduler
    text_encoders: tuple[PreTrainedModel, ...]
    tokenizers: tuple[PreTrainedTokenizerBase, ...]
    zeros_for_empty_prompt: bool = False  # an empty negative prompt conditions with zeros

    def modules(self) -> list[torch.nn.Module]:
        """The weights: what moves between devices."""
        return [self.denoiser, self.vae, *self.text_encoders]


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
    """Load each component its family names once, in `dtype` on `device`; fp16 files are
    preferred when asked. Each is of the class the checkpoint's `model_index.json` gives it,
    as diffusers' pipelines load them.

    `revision` pins a hub checkpoint to a commit, so a redeploy never picks up new weights.
    """
    with _LOAD_LOCK:
        variant = "fp16" if dtype == torch.float16 and not Path(source).is_dir() else None
        weights = {"torch_dtype": dtype, "variant": variant, "use_safetensors": True}
        index = DiffusionPipeline.load_config(source, revision=revision)
        family = family_of(index)
        if family is None:
            raise ValueError(
                f"{source} is none of the model families magicmix runs ({', '.join(FAMILIES)}):"
                f" its model_index.json lists {', '.join(listed_components(index))}"
            )

        def load(folder: str, **options: Any) -> Any:
            library, class_name = index[folder]
            if library not in LIBRARIES:
                raise ValueError(f"{source}: {folder} is a {library}.{class_name}, not loadable")
            kind = getattr(importlib.import_module(library), class_name)
            return kind.from_pretrained(source, subfolder=folder, revision=revision, **options)

        components = Components(
            family=family,
            vae=load("vae", **weights),
            denoiser=load(family.denoiser, **weights),
            # MagicMix is defined with a deterministic sampler; DDIM reads the checkpoint's own
            # noise schedule from its scheduler config, whatever scheduler class it names.
            scheduler=DDIMScheduler.from_pretrained(
                source, subfolder="scheduler", revision=revision
            ),
            text_encoders=tuple(load(e.folder, **weights) for e in family.text_encoders),
            tokenizers=tuple(load(e.tokenizer) for e in family.text_encoders),
            zeros_for_empty_prompt=bool(
                index.get("force_zeros_for_empty_prompt", family.zeros_for_empty_prompt)
            ),
        )
    for module in components.modules():
        module.to(device).eval().requires_grad_(False)
    return components
