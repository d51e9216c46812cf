"""The MagicMix engine: Algorithm 1 of Liew et al. 2022 (arXiv 2210.16056) on SD 1.x parts.

MagicMix keeps the *layout* of an image and gives it the *content* of a prompt. With the
scheduler's timesteps for `steps`, it runs only the last `int(kmax*steps)` of them:

1. Encode the layout image to z0 and noise it to the first timestep that is run (t = kmax).
2. Layout phase (Sec. 3.2), the first `int(kmax*steps) - int(kmin*steps)` steps: denoise one
   step with classifier-free guidance to get ẑ(t-1), noise z0 to the same t-1 to get
   z_layout(t-1), and continue from `mix_factor * ẑ + (1 - mix_factor) * z_layout`.
3. Content phase, the remaining `int(kmin*steps)` steps: plain guided denoising.
4. Decode the final latents.

Where we depart from the paper, and why:
- The sampler is always DDIM (eta = 0) on the checkpoint's own noise schedule: the paper's
  q(z_t | z0) and one-step denoiser assume a deterministic sampler, and a stateless one
  lets layout mixing happen between steps without corrupting multistep history.
- z0 is the mean of the VAE posterior, not a sample of it, so the same seed always gives
  the same image (the paper leaves this open).
- The unconditional text for guidance is `negative_prompt` (the paper uses "").
- All noise comes from a CPU `torch.Generator` seeded per sample (seed + i), drawn in a fixed
  order (start noise, then one draw per layout step), so results do not depend on the
  device's RNG or on what else shares the batch.

Where we differ from the diffusers community `magic_mix` pipeline: it draws the VAE sample
from the global RNG before seeding (not reproducible), ignores the negative prompt, mixes
before the UNet call instead of after the step, crashes on RGBA or greyscale input and
silently crops sizes that are not multiples of 8 (we validate and raise instead).
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image
from tqdm.auto import tqdm

from magicmix.engine.loading import (
    Components,
    load_components,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from magicmix.request import MixRequest, random_seed, validate_request


@dataclass(frozen=True)
class EngineOptions:
    """The GPU fast path, each part switchable so benchmarks can measure it alone."""

    sdpa: bool = True  # PyTorch scaled-dot-product attention (else diffusers' classic kernel)
    channels_last: bool = False  # NHWC memory format for the UNet and VAE convolutions
    tf32: bool = True  # TF32 matmuls/convs on Ampere+ (no effect on the CPU)
    compile: bool = False  # torch.compile the UNet and the VAE encoder and decoder
    fuse_qkv: bool = False  # one matmul for attention's q, k and v projections
    cudnn_benchmark: bool = True  # let cuDNN time its conv kernels once per shape (CUDA only)
    # Run each request's UNet, VAE and text encoder calls at batch size 1 inside a batch, so
    # a result is bit-identical to running that request alone (kernels pick different
    # algorithms per batch size; the difference is ~1/255). Costs most of batching's gain.
    batch_invariant: bool = False
    # With `compile`, UNet batches are padded up to one of these sizes so a few graphs
    # serve every batch instead of one compile per size.
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class MixResult:
    image: Image.Image
    seed: int


def mix_latents(denoised: torch.Tensor, layout: torch.Tensor, mix_factor: torch.Tensor):
    """Sec. 3.2 layout mixing: ν·ẑ(t-1) + (1-ν)·z_layout(t-1), ν per sample."""
    return mix_factor * denoised + (1.0 - mix_factor) * layout


def guidance_pad(values: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample scalars padded (with the last one) to `size` rows."""
    missing = size - values.shape[0]
    return values if missing <= 0 else torch.cat([values, values[-1:].expand(missing, -1, -1, -1)])


class MagicMixEngine:
    """Runs batches of `MixRequest`s on one loaded SD 1.x model. Knows nothing of HTTP or jobs."""

    def __init__(
        self,
        components: Components,
        *,
        device: torch.device,
        dtype: torch.dtype,
        text_cache_size: int = 256,
        options: EngineOptions | None = None,
    ) -> None:
        self.options = options or EngineOptions()
        self.components = components
        self.model_name = "custom"
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.latent_channels = components.unet.config.in_channels
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.unet_calls = 0  # UNet forward passes since load; tests and benchmarks read it
        self._vae_fp32: AutoencoderKL | None = None
        self._apply_options()

    @classmethod
    def load(
        cls,
        model: str,
        *,
        data_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        text_cache_size: int = 256,
        options: EngineOptions | None = None,
        revision: str | None = None,
    ) -> MagicMixEngine:
        """Load `model` (`tiny`, a diffusers directory or a hub id) onto the chosen device."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = resolve_model_source(model, data_dir)
        components = load_components(
            source, device=torch_device, dtype=torch_dtype, revision=revision
        )
        engine = cls(
            components,
            device=torch_device,
            dtype=torch_dtype,
            text_cache_size=text_cache_size,
            options=options,
        )
        engine.model_name = model
        return engine

    def _apply_options(self) -> None:
        unet, vae = self.components.unet, self.components.vae
        if self.options.sdpa:
            unet.set_attn_processor(AttnProcessor2_0())
            vae.set_attn_processor(AttnProcessor2_0())
        else:
            unet.set_attn_processor(AttnProcessor())
            vae.set_attn_processor(AttnProcessor())
        if self.options.channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        if self.options.fuse_qkv:
            unet.fuse_qkv_projections()
            vae.fuse_qkv_projections()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.options.tf32
            torch.backends.cudnn.allow_tf32 = self.options.tf32
            torch.backends.cudnn.benchmark = self.options.cudnn_benchmark
        if self.options.compile:
            unet.forward = torch.compile(unet.forward, fullgraph=True, dynamic=False)
            vae.decoder.forward = torch.compile(vae.decoder.forward, dynamic=False)
            vae.encoder.forward = torch.compile(vae.encoder.forward, dynamic=False)

    def describe(self) -> dict[str, str]:
        """What `system_details` reports about the loaded model."""
        return {
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def warmup(
        self, width: int = 768, height: int = 768, batch_sizes: Sequence[int] = (1,)
    ) -> None:
        """Run one tiny mix per batch size so compilation happens now, not on a request."""
        image = Image.new("RGB", (width, height), (127, 127, 127))
        for size in batch_sizes:
            requests = [
                MixRequest(
                    image=image,
                    prompt="warmup",
                    width=width,
                    height=height,
                    steps=2,
                    kmin=0.0,
                    kmax=1.0,
                    seed=i,
                )
                for i in range(size)
            ]
            self.mix(requests, progress=False)

    # -- public -----------------------------------------------------------------------

    def validate(self, request: MixRequest) -> None:
        """Raise `InvalidInput` naming the first bad field; never clamp or crop silently."""
        validate_request(request, vae_scale_factor=self.vae_scale_factor)

    @torch.inference_mode()
    def mix(self, requests: Sequence[MixRequest], *, progress: bool = True) -> list[MixResult]:
        """Mix every request; compatible ones (same `batch_key`) share UNet batches.

        Results come back in the order of `requests`. Sample i of a request seeded s uses
        seed s + i; the API sends one sample per request.
        """
        for request in requests:
            self.validate(request)
        seeds = [r.seed if r.seed is not None else random_seed() for r in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.batch_key(), []).append(index)
        results: list[MixResult | None] = [None] * len(requests)
        for indices in groups.values():
            images = self._run_batch(
                [requests[i] for i in indices], [seeds[i] for i in indices], progress=progress
            )
            for i, image in zip(indices, images, strict=True):
                results[i] = MixResult(image=image, seed=seeds[i])
        return [r for r in results if r is not None]

    def clear_cache(self) -> int:
        """Drop cached text embeddings (and the CUDA allocator's free blocks); returns entries."""
        dropped = len(self._text_cache)
        self._text_cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return dropped

    # -- Algorithm 1 ------------------------------------------------------------------

    def _run_batch(
        self, requests: list[MixRequest], seeds: list[int], *, progress: bool
    ) -> list[Image.Image]:
        first = requests[0]
        scheduler = DDIMScheduler.from_config(self.components.scheduler.config)
        scheduler.set_timesteps(first.steps)
        timesteps = scheduler.timesteps[first.steps - first.run_steps :]
        step_size = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        # 1. Layout image -> z0, noised to t = kmax.
        z0 = self._encode_images(requests)
        text = self._encode_text(requests)
        guidance = self._per_sample([r.guidance_scale for r in requests])
        nu = self._per_sample([r.mix_factor for r in requests])
        latents = scheduler.add_noise(z0, self._noise(generators, z0), timesteps[:1])

        bar = tqdm(timesteps, desc="magicmix", disable=not progress, file=sys.stderr, leave=False)
        for index, t in enumerate(bar):
            noise_pred = self._guided_noise(latents, t, text, guidance)
            denoised = scheduler.step(noise_pred, t, latents).prev_sample
            if index < first.layout_steps:
                # 2. Layout phase: pull the step back towards the layout, noised to t-1.
                prev_t = int(t) - step_size
                layout = (
                    scheduler.add_noise(z0, self._noise(generators, z0), torch.tensor([prev_t]))
                    if prev_t >= 0
                    else z0
                )
                latents = mix_latents(denoised, layout, nu)
            else:
                # 3. Content phase: plain guided denoising.
                latents = denoised
        # 4. Decode.
        return self._decode(latents)

    def _guided_noise(
        self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        """Classifier-free guidance with uncond and cond in one batched UNet call."""
        self.unet_calls += 1
        size = latents.shape[0]
        if self.options.batch_invariant and size > 1:  # text is [uncond..., cond...]
            return torch.cat(
                [
                    self._guided_noise_batch(
                        latents[i : i + 1], t, text[[i, size + i]], guidance[i : i + 1]
                    )
                    for i in range(size)
                ]
            )
        return self._guided_noise_batch(latents, t, text, guidance)

    def _guided_noise_batch(
        self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        size = latents.shape[0]
        padded = self._bucket(size)
        if padded > size:  # repeat the last sample so a compiled graph of this size is reused
            latents = torch.cat([latents, latents[-1:].expand(padded - size, -1, -1, -1)])
            uncond_text, cond_text = text.chunk(2)
            text = torch.cat(
                [
                    torch.cat([uncond_text, uncond_text[-1:].expand(padded - size, -1, -1)]),
                    torch.cat([cond_text, cond_text[-1:].expand(padded - size, -1, -1)]),
                ]
            )
        model_input = torch.cat([latents, latents])
        if self.options.channels_last:
            model_input = model_input.contiguous(memory_format=torch.channels_last)
        noise = self.components.unet(model_input, t, encoder_hidden_states=text).sample
        uncond, cond = noise.chunk(2)
        return (uncond + guidance_pad(guidance, padded) * (cond - uncond))[:size]

    def _bucket(self, size: int) -> int:
        if not self.options.compile:
            return size
        return next((b for b in sorted(self.options.batch_buckets) if b >= size), size)

    # -- helpers ----------------------------------------------------------------------

    def _per_sample(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=self.dtype, device=self.device).view(-1, 1, 1, 1)

    def _noise(self, generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise from each sample's CPU generator, moved to the device."""
        shape = like.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return noise.to(device=self.device, dtype=self.dtype)

    def _encode_images(self, requests: list[MixRequest]) -> torch.Tensor:
        vae = self.components.vae
        pixels = np.stack(
            [
                np.asarray(
                    r.image.convert("RGB").resize((r.width, r.height), Image.Resampling.BICUBIC),
                    dtype=np.float32,
                )
                for r in requests
            ]
        )
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1.0)
        batch = batch.to(device=self.device, dtype=self.dtype)
        if self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        latents = torch.cat([vae.encode(part).latent_dist.mean for part in self._pieces(batch)])
        if not torch.isfinite(latents).all():  # fp16 overflow: redo this batch in fp32
            latents = self._fp32_vae().encode(batch.float()).latent_dist.mean.to(self.dtype)
        return latents * vae.config.scaling_factor

    def _encode_text(self, requests: list[MixRequest]) -> torch.Tensor:
        """[uncond..., cond...] embeddings; the negative prompt is the unconditional text."""
        texts = [r.negative_prompt for r in requests] + [r.prompt for r in requests]
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            tokenizer = self.components.tokenizer
            ids = tokenizer(
                missing,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            encoder = self.components.text_encoder
            embeddings = torch.cat([encoder(part)[0] for part in self._pieces(ids)]).to(self.dtype)
            for text, embedding in zip(missing, embeddings, strict=True):
                self._text_cache[text] = embedding
        stacked = torch.stack([self._text_cache[t] for t in texts])
        for text in texts:
            self._text_cache.move_to_end(text)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return stacked

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.components.vae
        scaled = latents / vae.config.scaling_factor
        decoded = torch.cat([vae.decode(part).sample for part in self._pieces(scaled)])
        if not torch.isfinite(decoded).all():  # fp16 overflow: redo this batch in fp32
            decoded = self._fp32_vae().decode(scaled.float()).sample
        pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in array]

    def _pieces(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch as one piece, or one piece per sample when batch invariance is asked."""
        return batch.split(1) if self.options.batch_invariant else (batch,)

    def _fp32_vae(self) -> AutoencoderKL:
        """A float32 copy of the VAE, made only the first time half precision overflows."""
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.components.vae).to(torch.float32)
        return self._vae_fp32
