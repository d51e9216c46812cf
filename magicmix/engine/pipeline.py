"""The MagicMix engine: Algorithm 1 of Liew et al. 2022 (arXiv 2210.16056) on any model family.

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

Every family runs the same algorithm; what differs is how prompts condition the denoiser,
which the family's conditioner does (`conditioning.py`: SDXL's two encoders, pooled
embedding and size ids). The latent scale and the VAE's downsampling are read from the
loaded VAE's config. SDXL's VAE overflows in fp16, so where its config says `force_upcast`
it runs in fp32. A prompt longer than the text encoders read is cut, and each result says
so (`MixResult.prompt`, `negative_prompt`).

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

from magicmix.engine.conditioning import CONDITIONERS, Conditioning, EncodedText, TextRead
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
    # With `compile` on CUDA: capture the UNet in CUDA graphs (mode="reduce-overhead"),
    # so a step launches one graph instead of hundreds of kernels.
    cuda_graphs: bool = False
    # Host-to-GPU copies (noise, the layout batch) from pinned memory, asynchronously.
    pinned_transfers: bool = False


@dataclass(frozen=True)
class MixResult:
    image: Image.Image
    seed: int
    prompt: TextRead  # how much of the prompt the text encoders read
    negative_prompt: TextRead


def mix_latents(denoised: torch.Tensor, layout: torch.Tensor, mix_factor: torch.Tensor):
    """Sec. 3.2 layout mixing: ν·ẑ(t-1) + (1-ν)·z_layout(t-1), ν per sample."""
    return mix_factor * denoised + (1.0 - mix_factor) * layout


def vae_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """SD's VAE input: RGB images as one NCHW float batch in [-1, 1] (same size each)."""
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def guidance_pad(values: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample scalars padded (with the last one) to `size` rows."""
    missing = size - values.shape[0]
    return values if missing <= 0 else torch.cat([values, values[-1:].expand(missing, -1, -1, -1)])


class MagicMixEngine:
    """Runs batches of `MixRequest`s on one loaded model of any family. Knows nothing of HTTP."""

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
        self.source = "custom"  # where the weights came from (a folder or a hub id)
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.latent_channels = components.vae.config.latent_channels
        self.family = components.family
        self.conditioner = CONDITIONERS[self.family.conditioning](
            components, device=device, dtype=dtype, pieces=self._pieces
        )
        self._text_cache: OrderedDict[str, EncodedText] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.unet_calls = 0  # denoiser forward passes since load; tests and benchmarks read it
        self._vae_fp32: AutoencoderKL | None = None
        if dtype == torch.float16 and components.vae.config.get("force_upcast", False):
            components.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        self._vae_dtype = components.vae.dtype
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
        engine.model_name, engine.source = model, source
        return engine

    def _apply_options(self) -> None:
        unet, vae = self.components.denoiser, self.components.vae
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
            mode = "reduce-overhead" if self.options.cuda_graphs else None
            unet.forward = torch.compile(unet.forward, fullgraph=True, dynamic=False, mode=mode)
            vae.decoder.forward = torch.compile(vae.decoder.forward, dynamic=False)
            vae.encoder.forward = torch.compile(vae.encoder.forward, dynamic=False)

    def describe(self) -> dict[str, str]:
        """What `system_details` reports about the loaded model."""
        return {
            "model": self.model_name,
            "family": self.family.name,
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
        """Mix every request; compatible ones (same `batch_key`) share denoiser batches.

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
            batch = self._run_batch(
                [requests[i] for i in indices], [seeds[i] for i in indices], progress=progress
            )
            for i, result in zip(indices, batch, strict=True):
                results[i] = result
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
    ) -> list[MixResult]:
        first = requests[0]
        scheduler = DDIMScheduler.from_config(self.components.scheduler.config)
        scheduler.set_timesteps(first.steps)
        timesteps = scheduler.timesteps[first.steps - first.run_steps :]
        step_size = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        # 1. Layout image -> z0, noised to t = kmax.
        z0 = self._encode_images(requests)
        uncond, cond = self._encode_prompts(requests)
        conditioning = self.conditioner.condition(requests, uncond, cond)
        guidance = self._per_sample([r.guidance_scale for r in requests])
        nu = self._per_sample([r.mix_factor for r in requests])
        latents = scheduler.add_noise(z0, self._noise(generators, z0), timesteps[:1])

        bar = tqdm(timesteps, desc="magicmix", disable=not progress, file=sys.stderr, leave=False)
        for index, t in enumerate(bar):
            noise_pred = self._guided_noise(latents, t, conditioning, guidance)
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
        images = self._decode(latents)
        return [
            MixResult(image, seed, prompt=c.read, negative_prompt=u.read)
            for image, seed, u, c in zip(images, seeds, uncond, cond, strict=True)
        ]

    def _guided_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        """Classifier-free guidance with uncond and cond in one batched denoiser call."""
        self.unet_calls += 1
        size = latents.shape[0]
        if self.options.batch_invariant and size > 1:  # rows are [uncond..., cond...]
            return torch.cat(
                [
                    self._guided_noise_batch(
                        latents[i : i + 1], t, conditioning.rows([i, size + i]), guidance[i : i + 1]
                    )
                    for i in range(size)
                ]
            )
        return self._guided_noise_batch(latents, t, conditioning, guidance)

    def _guided_noise_batch(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        size = latents.shape[0]
        padded = self._bucket(size)
        if padded > size:  # repeat the last sample so a compiled graph of this size is reused
            latents = torch.cat([latents, latents[-1:].expand(padded - size, -1, -1, -1)])
            conditioning = conditioning.padded(padded)
        model_input = torch.cat([latents, latents])
        if self.options.channels_last:
            model_input = model_input.contiguous(memory_format=torch.channels_last)
        noise = self.conditioner.predict(model_input, t, conditioning)
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
        return self._to_device(noise).to(self.dtype)

    def _encode_images(self, requests: list[MixRequest]) -> torch.Tensor:
        vae = self.components.vae
        batch = vae_input(
            [
                r.image.convert("RGB").resize((r.width, r.height), Image.Resampling.BICUBIC)
                for r in requests
            ]
        )
        batch = self._to_device(batch).to(self._vae_dtype)
        if self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        latents = torch.cat([vae.encode(part).latent_dist.mean for part in self._pieces(batch)])
        if not torch.isfinite(latents).all():  # fp16 overflow: redo this batch in fp32
            latents = self._fp32_vae().encode(batch.float()).latent_dist.mean
        return latents.to(self.dtype) * vae.config.scaling_factor

    def _encode_prompts(
        self, requests: list[MixRequest]
    ) -> tuple[list[EncodedText], list[EncodedText]]:
        """Each request's negative prompt (the unconditional text) and prompt, encoded once
        per text and kept in an LRU cache: a burst of one prompt encodes it once."""
        texts = [r.negative_prompt for r in requests] + [r.prompt for r in requests]
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            encoded = self.conditioner.encode(missing)
            self._text_cache.update(zip(missing, encoded, strict=True))
        for text in texts:
            self._text_cache.move_to_end(text)
        entries = [self._text_cache[t] for t in texts]
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return entries[: len(requests)], entries[len(requests) :]

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.components.vae
        scaled = (latents / vae.config.scaling_factor).to(self._vae_dtype)
        decoded = torch.cat([vae.decode(part).sample for part in self._pieces(scaled)])
        if not torch.isfinite(decoded).all():  # fp16 overflow: redo this batch in fp32
            decoded = self._fp32_vae().decode(scaled.float()).sample
        pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in array]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the engine's device (from pinned memory when asked, on CUDA)."""
        if self.options.pinned_transfers and self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _pieces(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch as one piece, or one piece per sample when batch invariance is asked."""
        return batch.split(1) if self.options.batch_invariant else (batch,)

    def _fp32_vae(self) -> AutoencoderKL:
        """A float32 copy of the VAE, made only the first time half precision overflows."""
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.components.vae).to(torch.float32)
        return self._vae_fp32
