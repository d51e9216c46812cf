"""Engine speed on the tiny model: (a) MagicMix vs diffusers img2img, (b) optimized vs plain.

(a) MagicMix at kmax runs the same UNet calls as img2img at strength = kmax (20 steps,
kmax 0.5: 10 calls each), plus the layout mixing in between, so img2img on the same
weights is the natural floor: the engine should cost no more than ~5% over it.
(b) What the `MAGICMIX_*` defaults buy on a CPU (SDPA attention, channels_last, batching of
compatible requests, the text-embedding cache) over the plain engine, part by part.

    python -m benchmarks.engine [--quick] [--out DIR]
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline

from benchmarks.common import (
    Comparison,
    Context,
    Section,
    Target,
    benchmark,
    interleaved,
    layout_image,
    run_suite,
    seed_request,
)
from magicmix.engine import EngineOptions, MagicMixEngine
from magicmix.engine.configure import load_engine
from magicmix.request import MixRequest

ENGINE_TARGET = Target("<=", 1.05)
OPTIMIZED_SIZE = 256  # (b) runs 5 rungs x 4 images per round: minutes at 768 on 2 cores


class CallCounter:
    """Counts forward calls of a module, to show both sides ran the same UNet calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def img2img_pipeline(model_dir: Path) -> StableDiffusionImg2ImgPipeline:
    """diffusers' img2img on the same folder (DDIM, as saved), SDPA attention by default."""
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(model_dir), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def run_img2img(pipe: StableDiffusionImg2ImgPipeline, request: MixRequest) -> None:
    """img2img at strength = kmax with the request's prompt, steps, guidance and seed."""
    assert request.seed is not None  # nosec B101 - seed_request always sets one
    pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        image=request.image,
        strength=request.kmax,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    )


def mix_each(engine: MagicMixEngine, requests: Sequence[MixRequest], *, cached: bool) -> None:
    """One `mix` call per request; uncached clears the text cache first, as img2img pays CLIP."""
    for request in requests:
        if not cached:
            engine.clear_cache()
        engine.mix([request], progress=False)


def compare_with_img2img(
    engine: MagicMixEngine, pipe: StableDiffusionImg2ImgPipeline, size: int, repeats: int
) -> Comparison:
    request = seed_request(layout_image(size), size)
    pipe_calls = CallCounter(pipe.unet)
    engine_calls = engine.unet_calls
    samples = interleaved(
        {
            "engine": lambda: mix_each(engine, [request], cached=False),
            "img2img": lambda: run_img2img(pipe, request),
        },
        repeats,
    )
    pipe_calls.close()
    runs = repeats + 1  # the warm-up counts too
    per_image = {
        "engine": (engine.unet_calls - engine_calls) / runs,
        "img2img": pipe_calls.calls / runs,
    }
    return Comparison(
        case=f"{size}x{size}",
        unit="s/image",
        label="MagicMix engine",
        samples=samples["engine"],
        baseline_label="img2img strength=kmax",
        baseline_samples=samples["img2img"],
        target=ENGINE_TARGET,
        note=f"UNet calls per image: engine {per_image['engine']:g},"
        f" img2img {per_image['img2img']:g}",
    )


@benchmark("a", "engine vs diffusers img2img at strength = kmax, same weights and UNet calls")
def engine_vs_img2img(ctx: Context, out: Section) -> None:
    """Seconds per image of the shipped engine and img2img, interleaved, per size."""
    engine = load_engine(ctx.settings())
    pipe = img2img_pipeline(ctx.model_dir)
    for size in ctx.sizes:
        out.comparisons.append(compare_with_img2img(engine, pipe, size, ctx.repeats))
    out.details["engine_options"] = str(engine.options)
    out.notes += [
        "Seed example: 20 steps, kmin 0.3, kmax 0.5 (10 UNet calls, guidance 7.5), one"
        " warm-up each, then runs alternate engine/img2img; medians.",
        "Engine as `MAGICMIX_*` defaults load it, text cache cleared before each run so both"
        " sides encode the prompt; img2img is diffusers' own pipeline (SDPA, DDIM).",
    ]


@dataclass(frozen=True)
class Rung:
    """One step of (b)'s ladder: an engine, and how the requests reach it."""

    label: str
    engine: MagicMixEngine
    cached: bool  # text cache kept warm (else cleared before every request)
    batched: bool  # all requests in one `mix` call (else one call each)

    def run(self, requests: Sequence[MixRequest]) -> None:
        if self.batched:
            self.engine.mix(requests, progress=False)
        else:
            mix_each(self.engine, requests, cached=self.cached)


@benchmark("b", f"optimized engine vs plain, {OPTIMIZED_SIZE}x{OPTIMIZED_SIZE}")
def optimized_vs_plain(ctx: Context, out: Section) -> None:
    """Per-image seconds of the shipped defaults vs the plain engine, adding one part at a time."""
    settings = ctx.settings()

    def load(options: EngineOptions) -> MagicMixEngine:
        return MagicMixEngine.load(
            str(ctx.model_dir), data_dir=settings.data_dir, device="cpu", options=options
        )

    optimized = load_engine(settings)
    plain = load(EngineOptions(sdpa=False))
    sdpa = load(EngineOptions(sdpa=True, channels_last=False))
    size = settings.batch_size
    ladder = [
        Rung("plain: classic attention, 1 at a time, no cache", plain, False, False),
        Rung("+ SDPA attention", sdpa, False, False),
        Rung("+ channels_last", optimized, False, False),
        Rung("+ text cache", optimized, True, False),
        Rung(f"+ batch of {size} = the defaults", optimized, True, True),
    ]
    image = layout_image(OPTIMIZED_SIZE)
    requests = [seed_request(image, OPTIMIZED_SIZE, seed=1000 + i) for i in range(size)]
    samples = interleaved(
        {rung.label: functools.partial(rung.run, requests) for rung in ladder},
        ctx.repeats,
        warmups={
            "each engine": lambda: [e.mix(requests[:1], progress=False) for e in (plain, sdpa)],
            "batched": lambda: optimized.mix(requests, progress=False),
        },
    )
    per_image = {label: [s / size for s in runs] for label, runs in samples.items()}
    case = f"{OPTIMIZED_SIZE}, {size} requests"
    first, last = ladder[0].label, ladder[-1].label
    out.comparisons.append(
        Comparison(
            case, "s/image", "optimized (defaults)", per_image[last], "plain", per_image[first]
        )
    )
    for previous, rung in itertools.pairwise(ladder):
        out.comparisons.append(
            Comparison(
                case,
                "s/image",
                rung.label,
                per_image[rung.label],
                "previous row",
                per_image[previous.label],
            )
        )
    out.notes += [
        f"optimized = `MAGICMIX_*` defaults: {optimized.options}, {size} requests per batch"
        " (MAGICMIX_BATCH_SIZE), text cache warm. plain = EngineOptions(sdpa=False), one"
        " request at a time, text cache cleared before each. Rows after the first add one part"
        " at a time, each against the row before.",
        "torch.compile is not measured: it is the GPU path (MAGICMIX_COMPILE defaults to false;"
        " benchmarks/gpu.py measures it) and on a CPU its compile time would outweigh the"
        " seconds it could save here. TF32 does nothing on a CPU.",
    ]


BENCHES = (engine_vs_img2img, optimized_vs_plain)


def main(argv: Sequence[str] | None = None) -> None:
    run_suite(BENCHES, argv, default_out=None)


if __name__ == "__main__":
    main()
