"""Build Stable Diffusion models with random weights, offline and deterministically.

`tiny` is the embedded model the tests use: the SD 1.x architecture at toy sizes, so every
code path runs in seconds on a CPU (its images are noise); `tiny-sdxl` is the same for the
SDXL architecture (two text encoders, pooled embeddings, size/crop conditioning). `sd15`
and `sdxl` are the real architectures at full size, for measuring speed and memory on a
GPU machine that cannot reach a model hub. All are written as the diffusers folder that
`StableDiffusionPipeline` (or `StableDiffusionXLPipeline`) `.from_pretrained(DIR)` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from magicmix.families import SD1, SDXL, ModelFamily

Arch = Literal["tiny", "sd15", "tiny-sdxl", "sdxl"]
ARCH_FAMILY: dict[Arch, ModelFamily] = {"tiny": SD1, "sd15": SD1, "tiny-sdxl": SDXL, "sdxl": SDXL}
ARCHES: tuple[Arch, ...] = tuple(ARCH_FAMILY)
TINY_ARCH: dict[str, Arch] = {"sd1": "tiny", "sdxl": "tiny-sdxl"}  # by family name
BUILD_SEED = 20221029  # fixed, so two builds are byte-identical
CLIP_MAX_TOKENS = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character map (as in OpenAI's CLIP tokenizer)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def build_clip_tokenizer() -> CLIPTokenizer:
    """A real byte-level CLIP BPE tokenizer with the base alphabet and no learned merges.

    Every text tokenizes (byte by byte) exactly as CLIP's tokenizer would before merging;
    that is all a random-weight model needs, and it keeps the folder small.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = CLIP_MAX_TOKENS
    return tokenizer


def sd_scheduler() -> DDIMScheduler:
    """DDIM with the SD 1.x noise schedule (as in SD 1.5's scheduler config)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_unet(cross_attention_dim: int, **wiring: object) -> UNet2DConditionModel:
    """SD's UNet at toy sizes. Attention only in the deepest (1/4 resolution) block: at 768
    px a block at 1/2 resolution would attend over 2304 tokens and make every CPU test 20x
    slower."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        **wiring,
    )


def _tiny_modules(vocab_size: int) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    unet = _tiny_unet(cross_attention_dim=32)
    vae = small_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_TOKENS,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    return unet, vae, text_encoder


def small_vae(channels: tuple[int, ...] = (8, 16, 16, 16), **family: object) -> AutoencoderKL:
    """Four blocks, so the VAE downsamples by 8 as SD does; one layer each."""
    if len(channels) != 4:
        raise ValueError(f"an SD VAE has 4 blocks (the 8x latent scale), got {channels}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        **family,
    )


def _full_vae(**family: object) -> AutoencoderKL:
    """SD's VAE at full size (84M), the same for SD 1.5 and SDXL but for its scaling."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        **family,
    )


def _clip_l() -> CLIPTextModel:
    """CLIP ViT-L/14's text tower (123M): SD 1.5's encoder and SDXL's first."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=CLIP_MAX_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )


def _sd15_modules() -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """SD 1.5's exact configs (UNet 860M, VAE 84M, CLIP ViT-L/14 text tower 123M)."""
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return unet, _full_vae(sample_size=512), _clip_l()


def _tiny_sdxl_modules(
    vocab_size: int,
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's wiring at toy sizes: cross-attention over both encoders' hidden states, and
    the 'text_time' embedding of the pooled text plus six size/crop ids."""
    unet = _tiny_unet(
        cross_attention_dim=64,  # 32 + 32: the two encoders side by side
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled + 6 time ids
        use_linear_projection=True,
    )
    _, _, text_encoder = _tiny_modules(vocab_size)
    vae = small_vae(scaling_factor=SDXL.vae_scale, force_upcast=True)
    config = text_encoder.config.to_dict()
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**config, "projection_dim": 32, "hidden_act": "gelu"})
    )
    return unet, vae, text_encoder, text_encoder_2


def _sdxl_modules() -> tuple[
    UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection
]:
    """SDXL base 1.0's exact configs (UNet 2.6B, VAE 84M, CLIP ViT-L and OpenCLIP bigG)."""
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = _full_vae(sample_size=1024, scaling_factor=SDXL.vae_scale, force_upcast=True)
    text_encoder = _clip_l()
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=CLIP_MAX_TOKENS,
            hidden_act="gelu",
            projection_dim=1280,
        )
    )
    return unet, vae, text_encoder, text_encoder_2


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """The scheduler SDXL ships (the engine runs DDIM on its noise schedule)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def sd1_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> StableDiffusionPipeline:
    """An SD 1.x pipeline of these modules and SD's DDIM schedule, without a safety
    checker: the folder layout `save_pretrained` writes and the engine loads."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_random_model(directory: Path, arch: Arch = "tiny") -> Path:
    """Write a random-weight model of `arch` to `directory`; returns the directory."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHES)}")
    tokenizer = build_clip_tokenizer()
    pipeline: DiffusionPipeline
    with torch.random.fork_rng(devices=[]):  # seed locally, leave global RNG state untouched
        torch.manual_seed(BUILD_SEED)
        if ARCH_FAMILY[arch] is SD1:
            unet, vae, text_encoder = (
                _tiny_modules(vocab_size=len(tokenizer)) if arch == "tiny" else _sd15_modules()
            )
            pipeline = sd1_pipeline(unet, vae, text_encoder, tokenizer)
        else:
            unet, vae, text_encoder, text_encoder_2 = (
                _tiny_sdxl_modules(len(tokenizer)) if arch == "tiny-sdxl" else _sdxl_modules()
            )
            pipeline = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=build_clip_tokenizer(),
                unet=unet,
                scheduler=_sdxl_scheduler(),
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
