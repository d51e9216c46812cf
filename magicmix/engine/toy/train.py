"""Train the toy model: a Stable Diffusion 1.x of a few MB that has learned the toy world.

It has the component classes the engine loads (AutoencoderKL with 4 down blocks, i.e. the
8x latent scale; UNet2DConditionModel with cross-attention; CLIPTextModel + CLIPTokenizer;
DDIM with the SD 1.x `scaled_linear` betas), at toy sizes, and is written as a diffusers
folder by `StableDiffusionPipeline.save_pretrained`. `train_toy_model` trains the VAE, then
a text encoder (a stand-in for CLIP's pre-training), then the UNet on frozen-VAE latents,
epsilon prediction with caption dropout for classifier-free guidance. Seeded: the same seed
and thread count give the same weights on the same machine.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from magicmix.engine.builder import (
    CLIP_MAX_TOKENS,
    bytes_to_unicode,
    sd1_pipeline,
    sd_scheduler,
    small_vae,
)
from magicmix.engine.conditioning import token_ids
from magicmix.engine.pipeline import vae_input
from magicmix.engine.toy import write_manifest
from magicmix.engine.toy.world import COLOURS, SHAPES, Shape, random_shape, render, sample_spec

# -- the tokenizer ------------------------------------------------------------------------

# Whole-word tokens: every caption word is one token. Extra words let prompts a user might
# type ("a photo of a red circle") tokenize short too; anything else falls back to bytes.
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "on",
    "with",
    "photo",
    "shape",
    "object",
    "background",
    *list(COLOURS),
    *list(SHAPES),
    "white",
    "black",
    "orange",
    "purple",
    "star",
    "ring",
]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word (characters, the last one tagged </w>)."""
    parts = [*list(word[:-1]), word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [
            (ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(itertools.pairwise(parts))
        ]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer: the byte alphabet (any text tokenizes) plus merges that make each
    word of `WORDS` a single token. Built offline, deterministic, ~15 KB on disk."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        # Greedy: merge the first adjacent pair until the word is one token. A merge added
        # later has a lower priority, so it never changes how earlier words tokenize.
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = CLIP_MAX_TOKENS
    for word in WORDS:  # the real tokenizer agrees with the simulation above
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"{word!r} tokenizes as {tokenizer.convert_ids_to_tokens(ids)}")
    return tokenizer


# -- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (with the seed and the thread count)."""

    # VAE: trained on random crops of renders at several sizes.
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    vae_steps: int = 350
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-3
    vae_kl: float = 0.0
    # The latent layout is prescribed (soft, weight `vae_anchor`): channels 0-2 = `vae_chroma`
    # x the 8x8-average RGB, channel 3 = `vae_ink` x the 8x8-average "ink" (1 - brightness:
    # where the object is), each less its image mean (GroupNorm in the encoder only sees
    # values relative to the rest of the image). Strong ink, weak colour: at the noise levels
    # MagicMix runs at (t ~ 250-450) the object's place is plain in the noisy latent but its
    # colour is not, so the denoiser learns to take colour from the text there; that is what
    # lets the content phase recolour a layout. (Left alone the VAE encodes colour strongly
    # and arbitrarily and the text never decides it. At 0.12 the decoder confused
    # neighbouring hues, "a green square" came out blue; 0.5 keeps the four apart.)
    vae_anchor: float = 0.5
    vae_chroma: float = 0.5
    vae_ink: float = 2.0
    # The decoder sees the posterior mean (what the engine encodes) plus this fixed noise,
    # not a posterior sample: weak colour channels must survive decoding.
    vae_latent_noise: float = 0.02
    vae_object_crops: float = 0.5  # share of crops centred on the object (else uniform)
    vae_bf16: bool = True  # bf16 autocast for the VAE's training passes (AMX/AVX512-BF16)
    scale_images: int = 64  # 256 px renders whose latent spread sets the scaling factor
    # Diffusion: UNet + text encoder on frozen-VAE latents of whole images.
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_attention: tuple[bool, ...] = (False, False, True)  # cross-attention per level
    unet_only_cross: tuple[bool, ...] = (False, False, False)  # no self-attention there
    cross_dim: int = 64
    text_layers: int = 2
    text_steps: int = 300  # text encoder pre-training: see `pretrain_text_encoder`
    text_lr: float = 2e-3
    # (image size, number of images, batch size): latents precomputed once per size;
    # each step draws its batch from one size, in proportion to `unet_mix`.
    unet_sizes: tuple[int, ...] = (128, 256)
    unet_images: tuple[int, ...] = (3000, 800)
    unet_batches: tuple[int, ...] = (32, 8)
    unet_mix: tuple[float, ...] = (0.6, 0.4)
    unet_steps: int = 2400
    latents_bf16: bool = True  # encode the training latents under bf16 autocast (1.7x faster)
    unet_lr: float = 1.5e-3
    caption_dropout: float = 0.15  # empty caption, so classifier-free guidance works
    colour_only: float = 0.05  # "a red": partial captions give negative prompts a meaning
    min_snr_gamma: float = 5.0
    # Extra weight on high-noise steps, x0-error terms capped at this (0: none). With an
    # epsilon target, a colour error at high t costs ~snr in the loss and the text barely
    # matters; this weight makes the caption decide colour there (as a v-objective would).
    high_noise_weight: float = 5.0
    ema_decay: float = 0.998
    # Torch threads. 1 by default: on 2 shared cores a second thread buys little when the
    # machine is idle and costs a lot when it is not. Weights are reproducible per count.
    threads: int = 1


def build_vae(recipe: Recipe) -> AutoencoderKL:
    # scaling_factor is set from the trained encoder's latent spread
    return small_vae(tuple(recipe.vae_channels), scaling_factor=1.0)


def build_unet(recipe: Recipe) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in recipe.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(recipe.unet_attention))
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(recipe.unet_channels),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=recipe.cross_dim,
        attention_head_dim=8,
        norm_num_groups=16,
        only_cross_attention=tuple(recipe.unet_only_cross),
    )


def build_text_encoder(recipe: Recipe, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    vocab = len(tokenizer)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=recipe.cross_dim,
            intermediate_size=2 * recipe.cross_dim,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


# -- training -----------------------------------------------------------------------------


def _vae_batch(rng: np.random.Generator, recipe: Recipe) -> torch.Tensor:
    """Crops of `vae_crop` px from renders at 1x-4x that size, mostly on the object's edge."""
    crop = recipe.vae_crop
    images = []
    for _ in range(recipe.vae_batch):
        spec = random_shape(rng)
        size = int(crop * rng.choice([1, 1.5, 2, 3, 4]))
        image = render(spec, size)
        if size > crop:
            # Centre some crops within the object's extent (plus a margin), others anywhere.
            if rng.random() < recipe.vae_object_crops:
                reach = spec.size * size / 2 + crop / 4
                x = spec.cx * size + rng.uniform(-reach, reach)
                y = spec.cy * size + rng.uniform(-reach, reach)
            else:
                x, y = rng.uniform(0, size, size=2)
            left = int(np.clip(x - crop / 2, 0, size - crop))
            top = int(np.clip(y - crop / 2, 0, size - crop))
            image = image.crop((left, top, left + crop, top + crop))
        images.append(image)
    return vae_input(images)


def latent_target(batch: torch.Tensor, chroma: float, ink: float) -> torch.Tensor:
    """The latent layout the VAE is pulled towards (see `Recipe.vae_anchor`), centred."""
    rgb = F.avg_pool2d(batch, 8)  # in [-1, 1]
    target = torch.cat([chroma * rgb, ink * (1 - rgb.mean(1, keepdim=True)) / 2], dim=1)
    return target - target.mean((2, 3), keepdim=True)


def _linear_warmup_cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(recipe: Recipe, seed: int, *, progress: bool = True) -> AutoencoderKL:
    """Reconstruction (L1 + L2) with a small KL term; no perceptual or adversarial loss."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(recipe)
    rng = np.random.default_rng([seed, 1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _linear_warmup_cosine(s, recipe.vae_steps)
    )
    # The anchor in the target's own units per channel, so weak channels are held as firmly.
    scale = torch.tensor([recipe.vae_chroma] * 3 + [recipe.vae_ink]).view(1, 4, 1, 1)
    vae.train()
    bar = tqdm(range(recipe.vae_steps), desc="vae", disable=not progress, mininterval=2)
    for _ in bar:
        batch = _vae_batch(rng, recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.vae_bf16):
            posterior = vae.encode(batch).latent_dist
            z = posterior.mean + recipe.vae_latent_noise * torch.randn(
                posterior.mean.shape, generator=generator
            )
            recon = vae.decode(z).sample.float()
        rec = (recon - batch).abs().mean() + F.mse_loss(recon, batch)
        kl = posterior.kl().mean() / z[0].numel()
        mean = posterior.mean.float()
        target = latent_target(batch, recipe.vae_chroma, recipe.vae_ink)
        anchor = F.mse_loss((mean - mean.mean((2, 3), keepdim=True)) / scale, target / scale)
        loss = rec + recipe.vae_kl * kl + recipe.vae_anchor * anchor
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(
            rec=f"{rec.item():.4f}",
            kl=f"{kl.item():.2f}",
            anchor=f"{anchor.item():.4f}",
            refresh=False,
        )
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_world(
    vae: AutoencoderKL,
    seed: int,
    size: int,
    count: int,
    *,
    chunk: int = 32,
    bf16: bool = False,
    progress: bool = True,
) -> tuple[torch.Tensor, list[Shape]]:
    """Unscaled posterior means of world images 0..count-1 (seed `seed`) at `size` px."""
    specs = [sample_spec(seed, i) for i in range(count)]
    latents = []
    for start in tqdm(
        range(0, count, chunk), desc=f"latents {size}px", disable=not progress, mininterval=2
    ):
        batch = vae_input([render(s, size) for s in specs[start : start + chunk]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            latents.append(vae.encode(batch).latent_dist.mean.float())
    return torch.cat(latents), specs


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for shadow, p in zip(self.shadow, self.params, strict=True):
            p.copy_(shadow)


def latent_pools(
    recipe: Recipe, seed: int, vae: AutoencoderKL, *, progress: bool = True
) -> list[tuple[torch.Tensor, list[Shape]]]:
    """Scaled latents (and their specs) of fresh world images, one pool per training size."""
    pools = []
    for i, (size, count) in enumerate(zip(recipe.unet_sizes, recipe.unet_images, strict=True)):
        latents, specs = encode_world(
            vae, seed + 1000 * (i + 1), size, count, bf16=recipe.latents_bf16, progress=progress
        )
        pools.append((latents * vae.config.scaling_factor, specs))
    return pools


def caption_variants() -> list[tuple[str, int, int]]:
    """Every caption the training uses, with its (colour, shape) labels; -1 = not named."""
    captions = [("", -1, -1)]
    for c, colour in enumerate(COLOURS):
        captions.append((f"a {colour}", c, -1))
        for s, shape in enumerate(SHAPES):
            captions.append((f"a {colour} {shape}", c, s))
    for s, shape in enumerate(SHAPES):
        captions.append((f"a {shape}", -1, s))
    return captions


def pretrain_text_encoder(
    recipe: Recipe, seed: int, tokenizer: CLIPTokenizer, *, progress: bool = True
) -> CLIPTextModel:
    """Stand-in for CLIP's pre-training: every hidden state from the end of the caption on
    (the positions SD's UNet mostly attends to) must name the caption's colour and shape
    (or "none") through linear read-outs. Trained from scratch jointly with the UNet, the
    encoder learns one attribute and all but ignores the other within our step budget."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        encoder = build_text_encoder(recipe, tokenizer)
        heads = torch.nn.ModuleList(
            [
                torch.nn.Linear(recipe.cross_dim, len(COLOURS) + 1),
                torch.nn.Linear(recipe.cross_dim, len(SHAPES) + 1),
            ]
        )
    captions = caption_variants()
    ids = token_ids(tokenizer, [c for c, _, _ in captions])
    labels = torch.tensor([[c % (len(COLOURS) + 1), s % (len(SHAPES) + 1)] for _, c, s in captions])
    # Supervise from the end-of-text token on (causal attention: earlier ones cannot know).
    ends = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    positions = torch.arange(ids.shape[1])[None, :] >= ends[:, None]
    rows = positions.nonzero()[:, 0]
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.text_lr, weight_decay=0.0)
    encoder.train()
    bar = tqdm(range(recipe.text_steps), desc="text", disable=not progress, mininterval=2)
    for _ in bar:
        hidden = encoder(ids)[0][positions]
        loss = F.cross_entropy(heads[0](hidden), labels[rows, 0]) + F.cross_entropy(
            heads[1](hidden), labels[rows, 1]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return encoder.eval()


def train_diffusion(
    recipe: Recipe,
    seed: int,
    pools: list[tuple[torch.Tensor, list[Shape]]],
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    *,
    progress: bool = True,
) -> UNet2DConditionModel:
    """The UNet on epsilon prediction over frozen-VAE latents and frozen text states (as
    SD 1.x keeps CLIP frozen), with caption dropout for classifier-free guidance."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        unet = build_unet(recipe)
    captions = caption_variants()
    index_of = {text: i for i, (text, _, _) in enumerate(captions)}
    ids = token_ids(tokenizer, [text for text, _, _ in captions])
    with torch.no_grad():  # every caption the training uses, embedded once
        frozen = text_encoder(ids)[0]

    noise_schedule = DDPMScheduler.from_config(sd_scheduler().config)
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    loss_weight = torch.clamp(snr, max=recipe.min_snr_gamma) / snr  # min-SNR, eps target
    if recipe.high_noise_weight > 0:
        loss_weight = loss_weight + torch.clamp(1 / snr, max=recipe.high_noise_weight)

    generator = torch.Generator().manual_seed(seed + 11)
    rng = np.random.default_rng([seed, 2])
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _linear_warmup_cosine(s, recipe.unet_steps)
    )
    ema = _EMA([unet], recipe.ema_decay)
    unet.train()
    mix = np.asarray(recipe.unet_mix, dtype=np.float64)
    pool_odds = mix / mix.sum()
    bar = tqdm(range(recipe.unet_steps), desc="unet", disable=not progress, mininterval=2)
    for _ in bar:
        which = int(rng.choice(len(pools), p=pool_odds))
        latents, specs = pools[which]
        index = rng.integers(len(specs), size=recipe.unet_batches[which])
        texts = []
        for i in index:
            spec, u = specs[int(i)], rng.random()
            if u < recipe.caption_dropout:
                texts.append("")
            elif u < recipe.caption_dropout + recipe.colour_only:
                texts.append(f"a {spec.colour}")
            elif u < recipe.caption_dropout + 2 * recipe.colour_only:
                texts.append(f"a {spec.shape}")
            else:
                texts.append(spec.caption)
        rows = torch.tensor([index_of[t] for t in texts])
        z0 = latents[torch.from_numpy(index)]
        t = torch.randint(
            0, noise_schedule.config.num_train_timesteps, (len(index),), generator=generator
        )
        noise = torch.randn(z0.shape, generator=generator)
        noisy = noise_schedule.add_noise(z0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=frozen[rows]).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    ema.copy_to()
    return unet.eval().requires_grad_(False)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, seed: int, count: int = 64, size: int = 256) -> float:
    """1 / std of the posterior means over world images: unit-variance latents, as SD 1.x."""
    latents, _ = encode_world(vae, seed, size, count, progress=False)
    return float(1.0 / latents.std())


def save_toy_model(directory: Path, pipeline: StableDiffusionPipeline, info: dict) -> None:
    """The diffusers folder in fp16 (half the size; the engine loads it in its own dtype),
    the recipe that made it, and the SHA-256 manifest the loader checks."""
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.to(dtype=torch.float16).save_pretrained(directory, safe_serialization=True)
    (directory / "toy_recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    write_manifest(directory)


def train_toy_model(
    directory: str | Path, *, seed: int = 0, progress: bool = True, recipe: Recipe | None = None
) -> dict[str, float]:
    """Train the toy SD 1.x model and save it as a diffusers folder; returns seconds per phase.

    Reproducible given `seed`, the recipe and the thread count (`recipe.threads`), which
    holds for the training only: the process's own count is restored afterwards.
    """
    recipe = recipe or Recipe()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _train(Path(directory), seed, recipe, progress=progress)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block took to `timings[name]`."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _train(directory: Path, seed: int, recipe: Recipe, *, progress: bool) -> dict[str, float]:
    timings: dict[str, float] = {}
    with _timed(timings, "total_s"):
        tokenizer = build_tokenizer()
        with _timed(timings, "vae_s"):
            vae = train_vae(recipe, seed, progress=progress)
            scale = latent_scale(vae, seed + 99, count=recipe.scale_images)
            vae.register_to_config(scaling_factor=scale)
        with _timed(timings, "latents_s"):
            pools = latent_pools(recipe, seed, vae, progress=progress)
        with _timed(timings, "text_s"):
            text_encoder = pretrain_text_encoder(recipe, seed, tokenizer, progress=progress)
        with _timed(timings, "diffusion_s"):
            unet = train_diffusion(recipe, seed, pools, tokenizer, text_encoder, progress=progress)
        with _timed(timings, "save_s"):
            info = {
                "seed": seed,
                "recipe": asdict(recipe),
                "scaling_factor": vae.config.scaling_factor,
            }
            # A fresh tokenizer: a used one writes its last padding and truncation into the file.
            pipeline = sd1_pipeline(unet, vae, text_encoder, build_tokenizer())
            save_toy_model(directory, pipeline, info)
    return timings
