"""Model families: what magicmix knows about each kind of Stable Diffusion, one object each.

A `ModelFamily` is plain data that every layer reads: the request defaults (native size),
capacity (cost per image), the Modal app (the family from a model id, the batch size that
fits its GPUs), the weights download (hub files), the CLI, and the engine, which loads the
components the family names and conditions the denoiser with the family's `conditioning`
(`magicmix.engine.conditioning`). Adding a family is one object here, listed in
`FAMILIES`, plus its engine conditioning where no existing one fits.

Standard library only: `modal_app.py` imports this on a laptop with nothing but `modal`
installed, and the web tier (no weights, no torch) sizes requests with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOY, TINY = "toy", "tiny"  # the models magicmix ships (trained) and builds (random weights)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a checkpoint and its tokenizer, by their folders."""

    folder: str
    tokenizer: str
    # which hidden states condition the denoiser: None, the final output (after the last
    # layer norm); -2, the penultimate layer's (SDXL's choice, for both of its encoders)
    hidden_layer: int | None = None
    pooled: bool = False  # its projected pooled embedding conditions the denoiser too


@dataclass(frozen=True)
class ModelFamily:
    """One kind of Stable Diffusion: how to find it, run it, size it and pay for it."""

    name: str  # what MAGICMIX_MODEL_FAMILY and system_details say
    title: str
    native_size: int  # the output side when a request gives none: what it was trained at
    # the VAE: pixels per latent and the latents' scale. The engine reads both from the
    # loaded VAE's config; these are for the torch-free side and the random-weight builders
    latent_factor: int
    vae_scale: float
    denoiser: str  # its folder: "unet" here; a transformer family (SD3, Flux) names its own
    # every encoder's hidden states side by side (the feature axis), in this order; the
    # pooled embeddings of those marked `pooled` likewise
    text_encoders: tuple[TextEncoder, ...]
    conditioning: str  # the engine's conditioner for this family (engine/conditioning.py)
    size_ids: bool  # SDXL's micro-conditioning: original size, crop corner, target size
    # an empty negative prompt conditions with zeros, unless model_index.json says otherwise
    zeros_for_empty_prompt: bool
    batch_size: int  # jobs per batch that fit every GPU offered on Modal, in fp16
    cost: float  # GPU seconds per image relative to SD 1.5 at 768 px (capacity.py)
    name_hint: str | None = None  # a hub id containing this names the family (a guess)

    @property
    def components(self) -> tuple[str, ...]:
        """The checkpoint folders the engine loads (the scheduler besides)."""
        pairs = [(e.folder, e.tokenizer) for e in self.text_encoders]
        return (self.denoiser, "vae", *(folder for pair in pairs for folder in pair))

    @property
    def hub_files(self) -> tuple[str, ...]:
        """The files of a hub checkpoint the engine reads (fp16 weights), and no more:
        safety checkers, full-precision and .ckpt weights and EMA copies stay on the hub."""
        files = ["model_index.json", "scheduler/*.json"]
        for folder in (self.denoiser, "vae"):
            files += [f"{folder}/config.json", f"{folder}/diffusion_pytorch_model.fp16.safetensors"]
        for encoder in self.text_encoders:
            files += [
                f"{encoder.folder}/config.json",
                f"{encoder.folder}/model.fp16.safetensors",
                f"{encoder.tokenizer}/*",
            ]
        return tuple(files)


SD1 = ModelFamily(
    name="sd1",
    title="SD 1.x",
    native_size=768,
    latent_factor=8,
    vae_scale=0.18215,
    denoiser="unet",
    text_encoders=(TextEncoder("text_encoder", "tokenizer"),),
    conditioning="clip",
    size_ids=False,
    zeros_for_empty_prompt=False,
    batch_size=8,
    cost=1.0,  # H200, batch 8, 768 px, 20 steps, kmax 0.5: 0.23 s (capacity.py)
)
SDXL = ModelFamily(
    name="sdxl",
    title="SDXL",
    native_size=1024,
    latent_factor=8,
    vae_scale=0.13025,
    denoiser="unet",
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", hidden_layer=-2),
        TextEncoder("text_encoder_2", "tokenizer_2", hidden_layer=-2, pooled=True),
    ),
    conditioning="clip",
    size_ids=True,
    zeros_for_empty_prompt=True,  # diffusers' SDXL pipeline default
    batch_size=4,
    cost=4.0,  # at 1024 px: an estimate, not measured
    name_hint="xl",
)
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SDXL)}
DEFAULT = SD1  # the family of a model nothing tells us about
BUILTIN = {TINY: SD1, TOY: SD1}


def family_named(name: str) -> ModelFamily:
    """The family called `name`; a `ValueError` listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise ValueError(f"unknown model family {name!r}; expected one of {known}") from None


def resolve_family(
    model: str, configured: str = "auto", *, revision: str | None = None
) -> ModelFamily:
    """The family to size requests for: as configured, else detected, else guessed."""
    if configured != "auto":
        return family_named(configured)
    return detect_family(model, revision=revision) or guess_family(model)


def guess_family(model: str) -> ModelFamily:
    """The family a model's name suggests, without its files (where a deploy starts)."""
    if model in BUILTIN:
        return BUILTIN[model]
    lowered = model.lower()
    hinted = (f for f in FAMILIES.values() if f.name_hint and f.name_hint in lowered)
    return next(hinted, DEFAULT)


def listed_components(index: dict[str, Any]) -> list[str]:
    """The components a pipeline's `model_index.json` names a class for (not `[null, null]`)."""
    return [
        name
        for name, entry in index.items()
        if isinstance(entry, list) and entry and entry[0] is not None
    ]


def family_of(index: dict[str, Any]) -> ModelFamily | None:
    """The family whose components a pipeline's `model_index.json` lists; where several
    fit (SDXL's components include SD 1.x's), the one that names the most. None: none fits."""
    listed = set(listed_components(index))
    fitting = [f for f in FAMILIES.values() if listed.issuperset(f.components)]
    return max(fitting, key=lambda family: len(family.components), default=None)


def detect_family(source: str, *, revision: str | None = None) -> ModelFamily | None:
    """The family of a built-in name, a diffusers folder or a cached hub id; None if unknown."""
    if source in BUILTIN:
        return BUILTIN[source]
    path = Path(source).expanduser() / "model_index.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache  # no download: the cache or nothing

        cached = try_to_load_from_cache(source, "model_index.json", revision=revision)
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    return family_of(json.loads(path.read_text()))
