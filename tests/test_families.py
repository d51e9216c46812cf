"""A model family is one object: every torch-free reader follows it, and so would a new one.

The engine's side (components loaded by the family's names, its conditioning) is pinned in
tests/test_engine.py and tests/test_sdxl.py; a deployment's (the family from a model id,
its batch size) in tests/test_modal_app.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from magicmix import families
from magicmix.capacity import seconds_per_image
from magicmix.config import Settings
from magicmix.families import (
    SD1,
    SDXL,
    ModelFamily,
    TextEncoder,
    family_named,
    family_of,
    guess_family,
    resolve_family,
)
from magicmix.request import MixParams


def index(*components: str) -> dict[str, Any]:
    """A model_index.json naming these components (and a safety checker left out)."""
    listed: dict[str, Any] = {name: ["diffusers", "Anything"] for name in components}
    return {"_class_name": "Pipeline", "safety_checker": [None, None], **listed}


SD1_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def test_the_family_is_the_one_whose_components_the_index_names() -> None:
    assert family_of(index(*SD1_PARTS)) is SD1
    assert family_of(index(*SD1_PARTS, "text_encoder_2", "tokenizer_2")) is SDXL
    partial = index(*SD1_PARTS, "text_encoder_2")  # no second tokenizer: not SDXL
    assert family_of(partial) is SD1
    assert family_of(index("transformer", "vae", "text_encoder", "tokenizer")) is None
    assert family_of({**index(*SD1_PARTS), "unet": [None, None]}) is None


def test_configured_then_detected_then_guessed_from_the_name() -> None:
    assert resolve_family("org/anything-xl", "sd1") is SD1  # configured wins
    assert resolve_family("org/not-in-the-cache") is SD1
    assert resolve_family("stabilityai/stable-diffusion-xl-base-1.0") is SDXL  # by its name
    assert guess_family("toy") is guess_family("tiny") is SD1
    with pytest.raises(ValueError, match="unknown model family 'sd9'; expected one of sd1, sdxl"):
        family_named("sd9")
    with pytest.raises(ValidationError, match="sd9"):
        Settings(model_family="sd9")


def test_hub_files_are_the_fp16_weights_of_the_family_components_only() -> None:
    assert SD1.hub_files == (
        "model_index.json",
        "scheduler/*.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/*",
    )
    assert set(SDXL.hub_files) - set(SD1.hub_files) == {
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        "tokenizer_2/*",
    }


def test_sizes_capacity_and_the_queue_read_the_family() -> None:
    params = MixParams(prompt="p")
    assert params.size_for(SD1) == (768, 768) and params.size_for(SDXL) == (1024, 1024)
    assert MixParams(prompt="p", width=512).size_for(SDXL) == (512, 1024)
    assert seconds_per_image("L40S", SDXL) == SDXL.cost * seconds_per_image("L40S")
    sd1 = Settings(gpu="H200", max_gpus=8, model="org/sd")
    sdxl = Settings(gpu="H200", max_gpus=8, model="org/sd", model_family="sdxl")
    assert sdxl.max_queue == pytest.approx(sd1.max_queue / SDXL.cost, rel=0.01)
    assert (
        Settings(gpu="H200", model="org/some-xl").max_queue
        == Settings(gpu="H200", model_family="sdxl").max_queue
    )  # a deploy names the family, or the model id suggests it


def test_a_new_family_is_one_object_on_the_torch_free_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a maintainer adds for a transformer family (SD3-like): the object, registered.
    Sizes, capacity, configuration, the name guess, detection and the hub files follow."""
    sd3 = ModelFamily(
        name="sd3",
        title="SD 3",
        native_size=1024,
        latent_factor=8,
        vae_scale=1.5305,
        denoiser="transformer",
        text_encoders=(
            TextEncoder("text_encoder", "tokenizer", hidden_layer=-2, pooled=True),
            TextEncoder("text_encoder_2", "tokenizer_2", hidden_layer=-2, pooled=True),
            TextEncoder("text_encoder_3", "tokenizer_3"),
        ),
        conditioning="sd3",
        size_ids=False,
        zeros_for_empty_prompt=False,
        batch_size=2,
        cost=6.0,
        name_hint="stable-diffusion-3",
    )
    monkeypatch.setitem(families.FAMILIES, "sd3", sd3)
    parts = [f"{kind}{n}" for kind in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")]
    assert family_of(index("transformer", "vae", "scheduler", *parts)) is sd3
    assert family_of(index(*SD1_PARTS, "text_encoder_2", "tokenizer_2")) is SDXL  # unchanged
    assert guess_family("stabilityai/stable-diffusion-3-medium-diffusers") is sd3
    assert MixParams(prompt="p").size_for(sd3) == (1024, 1024)
    settings = Settings(gpu="H100", model="org/m", model_family="sd3")
    assert settings.family_guess is sd3
    assert seconds_per_image("H100", sd3) == 6.0 * seconds_per_image("H100")
    assert "transformer/diffusion_pytorch_model.fp16.safetensors" in sd3.hub_files
    assert "tokenizer_3/*" in sd3.hub_files and "unet/config.json" not in sd3.hub_files
