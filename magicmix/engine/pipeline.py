"""The MagicMix engine: Algorithm 1 of Liew et al. 2022 (arXiv 2210.16056) on SD 1.x or SDXL.

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

On SDXL the same algorithm runs with SDXL's conditioning: the two text encoders' penultimate
hidden states side by side, the second encoder's pooled embedding, and the size/crop time
ids (original = target = the output size, crop (0, 0)), for the unconditional and the
conditional rows alike; an empty negative prompt is zeros where the checkpoint asks for
that (`force_zeros_for_empty_prompt`), as diffusers' SDXL pipeline does. SDXL's VAE
overflows in fp16, so where its config says `force_upcast` it runs in fp32.

Where we differ from the diffusers community `magic_mix` pipeline: it draws the VAE sample
from the global RNG before seeding (not reproducible), ignores the negative prompt, mixes
before the UNet call instead of after the step, crashes on RGBA or greyscale input and
silently crops sizes that are not multiples of 8 (we validate and raise instead).
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

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


@dataclass(frozen=True)
class Conditioning:
    """What guides the UNet, for rows [uncond..., cond...]: text, and SDXL's extras."""

    text: torch.Tensor  # (2B, tokens, dim)
    pooled: torch.Tensor | None = None  # (2B, projection): SDXL's pooled text embedding
    time_ids: torch.Tensor | None = None  # (2B, 6): SDXL's size and crop conditioning

    def rows(self, index: list[int]) -> Conditioning:
        return self._map(lambda tensor: tensor[index])

    def padded(self, to: int) -> Conditioning:
        """Each half padded (with its last row) to `to` rows."""

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            halves = tensor.chunk(2)
            missing = to - halves[0].shape[0]
            return torch.cat([torch.cat([h, h[-1:].expand(missing, *h.shape[1:])]) for h in halves])

        return self._map(pad)

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning(
            change(self.text),
            None if self.pooled is None else change(self.pooled),
            None if self.time_ids is None else change(self.time_ids),
        )

    def unet_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {"encoder_hidden_states": self.text}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def mix_latents(denoised: torch.Tensor, layout: torch.Tensor, mix_factor: torch.Tensor):
    """Sec. 3.2 layout mixing: ν·ẑ(t-1) + (1-ν)·z_layout(t-1), ν per sample."""
    return mix_factor * denoised + (1.0 - mix_factor) * layout


def vae_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """SD's VAE input: RGB images as one NCHW float batch in [-1, 1] (same size each)."""
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """SD's text input: every text padded (or cut) to the tokenizer's 77 tokens."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def guidance_pad(values: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample scalars padded (with the last one) to `size` rows."""
    missing = size - values.shape[0]
    return values if missing <= 0 else torch.cat([values, values[-1:].expand(missing, -1, -1, -1)])


class MagicMixEngine:
    """Runs batches of `MixRequest`s on one loaded SD 1.x or SDXL model. Knows nothing of HTTP."""

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
        self.latent_channels = components.unet.config.in_channels
        self.family = components.family
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.unet_calls = 0  # UNet forward passes since load; tests and benchmarks read it
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
            mode = "reduce-overhead" if self.options.cuda_graphs else None
            unet.forward = torch.compile(unet.forward, fullgraph=True, dynamic=False, mode=mode)
            vae.decoder.forward = torch.compile(vae.decoder.forward, dynamic=False)
            vae.encoder.forward = torch.compile(vae.encoder.forward, dynamic=False)

    def describe(self) -> dict[str, str]:
        """What `system_details` reports about the loaded model."""
        return {
            "model": self.model_name,
            "family": self.family,
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
        conditioning = self._condition(requests)
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
        return self._decode(latents)

    def _guided_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        """Classifier-free guidance with uncond and cond in one batched UNet call."""
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
        noise = self.components.unet(model_input, t, **conditioning.unet_kwargs()).sample
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

    def _condition(self, requests: list[MixRequest]) -> Conditioning:
        """[uncond..., cond...] rows; the negative prompt is the unconditional text."""
        texts = [r.negative_prompt for r in requests] + [r.prompt for r in requests]
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            states, pooled_states = self._encode_texts(missing)
            for index, text in enumerate(missing):
                pooled_one = None if pooled_states is None else pooled_states[index]
                self._text_cache[text] = (states[index], pooled_one)
        entries = [self._text_cache[t] for t in texts]
        for text in texts:
            self._text_cache.move_to_end(text)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        hidden = torch.stack([state for state, _ in entries])
        if self.components.text_encoder_2 is None:
            return Conditioning(hidden)
        pooled = torch.stack([p for _, p in entries if p is not None])
        if self.components.force_zeros_for_empty_prompt:  # as diffusers' SDXL pipeline does
            empty = [t == "" for t in texts[: len(requests)]] + [False] * len(requests)
            mask = torch.tensor(empty, device=self.device)
            hidden = torch.where(mask.view(-1, 1, 1), torch.zeros_like(hidden), hidden)
            pooled = torch.where(mask.view(-1, 1), torch.zeros_like(pooled), pooled)
        # original size, crop corner, target size: the output size, uncropped
        sizes = [[r.height, r.width, 0, 0, r.height, r.width] for r in requests]
        time_ids = torch.tensor(sizes * 2, dtype=self.dtype, device=self.device)
        return Conditioning(hidden, pooled, time_ids)

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per text: its hidden states (and SDXL's pooled embedding)."""
        parts = self.components
        if parts.text_encoder_2 is None or parts.tokenizer_2 is None:
            ids = self._token_ids(parts.tokenizer, texts)
            hidden = torch.cat([parts.text_encoder(piece)[0] for piece in self._pieces(ids)])
            return hidden.to(self.dtype), None
        states, pooled = [], None
        for tokenizer, encoder in (
            (parts.tokenizer, parts.text_encoder),
            (parts.tokenizer_2, parts.text_encoder_2),
        ):
            ids = self._token_ids(tokenizer, texts)
            outputs = [encoder(piece, output_hidden_states=True) for piece in self._pieces(ids)]
            states.append(torch.cat([out.hidden_states[-2] for out in outputs]))
            if encoder is parts.text_encoder_2:
                pooled = torch.cat([out[0] for out in outputs])  # the projected pooled output
        hidden = torch.cat(states, dim=-1)
        assert pooled is not None  # nosec B101 - the second encoder ran
        return hidden.to(self.dtype), pooled.to(self.dtype)

    def _token_ids(self, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
        return token_ids(tokenizer, texts).to(self.device)

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
