"""The engine follows Algorithm 1 of the MagicMix paper and is reproducible."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from magicmix.engine import MagicMixEngine, mix_latents
from magicmix.engine.conditioning import TextRead
from magicmix.errors import InvalidInput
from magicmix.inputs.images import png_bytes
from magicmix.request import MixRequest
from tests.conftest import make_layout_image


def one(engine: MagicMixEngine, **fields) -> bytes:
    fields.setdefault("image", make_layout_image())
    fields.setdefault("prompt", "Bed")
    fields.setdefault("width", 256)
    fields.setdefault("height", 256)
    (result,) = engine.mix([MixRequest(**fields)], progress=False)
    return png_bytes(result.image)


def test_same_seed_gives_identical_png_bytes(engine: MagicMixEngine) -> None:
    assert one(engine, seed=1) == one(engine, seed=1)


def test_another_seed_differs(engine: MagicMixEngine) -> None:
    assert one(engine, seed=1) != one(engine, seed=2)


def test_negative_prompt_changes_result(engine: MagicMixEngine) -> None:
    assert one(engine, seed=3) != one(engine, seed=3, negative_prompt="low quality")


def test_prompt_changes_result(engine: MagicMixEngine) -> None:
    assert one(engine, seed=3, prompt="Bed") != one(engine, seed=3, prompt="a red car")


def test_layout_image_changes_result(engine: MagicMixEngine) -> None:
    assert one(engine, seed=3) != one(engine, seed=3, image=make_layout_image(seed=7))


def test_output_has_requested_size(engine: MagicMixEngine) -> None:
    (result,) = engine.mix(
        [MixRequest(image=make_layout_image(), prompt="x", width=320, height=192, seed=0)],
        progress=False,
    )
    assert result.image.size == (320, 192)
    assert result.image.mode == "RGB"


def test_random_seed_is_reported_and_reproduces(engine: MagicMixEngine) -> None:
    request = MixRequest(image=make_layout_image(), prompt="Bed", width=256, height=256)
    (first,) = engine.mix([request], progress=False)
    assert 0 <= first.seed < 2**32
    assert one(engine, seed=first.seed) == png_bytes(first.image)


@pytest.mark.parametrize(
    ("steps", "kmin", "kmax", "unet_calls", "mixed"),
    [
        (20, 0.3, 0.5, 10, 4),
        (50, 0.3, 0.6, 30, 15),
        (10, 0.0, 1.0, 10, 10),
        (7, 0.5, 0.5, 3, 0),
        (1, 0.0, 1.0, 1, 1),
        (25, 0.33, 0.77, 19, 11),
    ],
)
def test_unet_calls_and_mixed_steps_follow_the_formula(
    engine: MagicMixEngine,
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
    kmin: float,
    kmax: float,
    unet_calls: int,
    mixed: int,
) -> None:
    mixes: list[int] = []
    import magicmix.engine.pipeline as engine_module

    real_mix = engine_module.mix_latents

    def counting_mix(*args):
        mixes.append(1)
        return real_mix(*args)

    monkeypatch.setattr(engine_module, "mix_latents", counting_mix)
    before = engine.unet_calls
    request = MixRequest(
        image=make_layout_image(),
        prompt="p",
        width=64,
        height=64,
        steps=steps,
        kmin=kmin,
        kmax=kmax,
        seed=0,
    )
    assert request.run_steps == int(kmax * steps) == unet_calls
    assert request.layout_steps == int(kmax * steps) - int(kmin * steps) == mixed
    engine.mix([request], progress=False)
    assert engine.unet_calls - before == unet_calls
    assert len(mixes) == mixed


def test_mixing_step_matches_the_formula() -> None:
    denoised = torch.full((2, 4, 2, 2), 2.0)
    layout = torch.full((2, 4, 2, 2), -1.0)
    nu = torch.tensor([0.25, 1.0]).view(-1, 1, 1, 1)
    out = mix_latents(denoised, layout, nu)
    assert torch.allclose(out[0], torch.full((4, 2, 2), 0.25 * 2.0 + 0.75 * -1.0))
    assert torch.equal(out[1], denoised[1])


def test_mix_factor_zero_in_a_full_layout_phase_returns_the_layout_latents(
    engine: MagicMixEngine,
) -> None:
    """With ν=0 and kmin=0, every step resets to the noised layout and the last one to z0."""
    image = make_layout_image(64, 64)
    (result,) = engine.mix(
        [
            MixRequest(
                image=image,
                prompt="p",
                width=64,
                height=64,
                steps=4,
                kmin=0.0,
                kmax=1.0,
                mix_factor=0.0,
                seed=0,
            )
        ],
        progress=False,
    )
    with torch.inference_mode():
        request = MixRequest(image=image, prompt="p", width=64, height=64)
        expected = engine._decode(engine._encode_images([request]))[0]
    assert png_bytes(result.image) == png_bytes(expected)


def test_batch_returns_results_in_request_order(engine: MagicMixEngine) -> None:
    requests = [
        MixRequest(image=make_layout_image(), prompt="Bed", width=256, height=256, seed=1),
        MixRequest(image=make_layout_image(), prompt="Bed", width=128, height=128, seed=1),
        MixRequest(image=make_layout_image(), prompt="cat", width=256, height=256, seed=2),
    ]
    before = engine.unet_calls
    results = engine.mix(requests, progress=False)
    assert [r.image.size for r in results] == [(256, 256), (128, 128), (256, 256)]
    assert [r.seed for r in results] == [1, 1, 2]
    # two compatible groups -> two batched runs of 10 UNet calls each
    assert engine.unet_calls - before == 20


def test_batched_results_match_running_alone(engine: MagicMixEngine) -> None:
    """Same seeds give the same images whether batched or alone, within float tolerance."""
    requests = [
        MixRequest(image=make_layout_image(seed=s), prompt=p, width=128, height=128, seed=s)
        for p, s in [("Bed", 1), ("cat", 5), ("dog", 9)]
    ]
    batched = engine.mix(requests, progress=False)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = engine.mix([request], progress=False)
        a = torch.tensor(list(alone.image.getdata()), dtype=torch.int16)
        b = torch.tensor(list(together.image.getdata()), dtype=torch.int16)
        assert (a - b).abs().max().item() <= 2


def test_batch_invariant_mode_is_bit_identical_to_running_alone(tiny_model_dir) -> None:
    """The option trades batching's speed for results independent of batch company."""
    from magicmix.engine import EngineOptions

    engine = MagicMixEngine.load(
        str(tiny_model_dir),
        data_dir=tiny_model_dir.parent,
        device="cpu",
        options=EngineOptions(batch_invariant=True),
    )
    requests = [
        MixRequest(
            image=make_layout_image(seed=s),
            prompt=p,
            negative_prompt=n,
            width=128,
            height=128,
            seed=s,
        )
        for p, n, s in [("Bed", "", 1), ("cat", "blur", 5), ("dog", "", 9)]
    ]
    batched = [png_bytes(r.image) for r in engine.mix(requests, progress=False)]
    engine.clear_cache()
    alone = [png_bytes(engine.mix([r], progress=False)[0].image) for r in requests]
    assert batched == alone


def test_rgba_and_greyscale_inputs_work(engine: MagicMixEngine) -> None:
    for mode in ("RGBA", "L", "CMYK"):
        image = make_layout_image().convert(mode)
        (result,) = engine.mix(
            [MixRequest(image=image, prompt="p", width=64, height=64, seed=0)], progress=False
        )
        assert result.image.size == (64, 64)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"kmin": 0.6, "kmax": 0.5}, "kmax"),
        ({"kmin": -0.1}, "kmin"),
        ({"kmax": 1.5}, "kmax"),
        ({"steps": 0}, "steps"),
        ({"mix_factor": 1.2}, "mix_factor"),
        ({"width": 100}, "width"),
        ({"height": 0}, "height"),
        ({"seed": -1}, "seed"),
        ({"steps": 1, "kmax": 0.5}, "kmax"),
    ],
)
def test_bad_inputs_raise_invalid_input_naming_the_field(
    engine: MagicMixEngine, fields: dict, field: str
) -> None:
    request = MixRequest(image=Image.new("RGB", (64, 64)), prompt="p", **fields)
    with pytest.raises(InvalidInput) as caught:
        engine.mix([request], progress=False)
    assert caught.value.field == field


def test_text_cache_is_used_and_clearable(engine: MagicMixEngine) -> None:
    engine.clear_cache()
    one(engine, seed=0, prompt="cache me", negative_prompt="neg")
    assert "cache me" in engine._text_cache and "neg" in engine._text_cache
    assert engine.clear_cache() >= 2
    assert not engine._text_cache


def test_a_prompt_past_the_encoders_window_is_cut_and_said(
    engine: MagicMixEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """CLIP reads 75 tokens besides its start and end markers; the tiny model's byte-level
    tokenizer makes one token of each character, so 76 are one too many."""
    fits, cut = "y" * 75, "z" * 76
    requests = [
        MixRequest(image=make_layout_image(), prompt=p, negative_prompt=n, width=256, height=256)
        for p, n in ((fits, "blurry"), (cut, cut))
    ]
    with caplog.at_level(logging.WARNING, logger="magicmix.engine.conditioning"):
        fitting, too_long = engine.mix(requests, progress=False)
    assert fitting.prompt == TextRead(75, False) and fitting.negative_prompt == TextRead(6, False)
    assert too_long.prompt == too_long.negative_prompt == TextRead(76, True)
    assert caplog.messages == ["a text of 76 tokens was cut to the 75 read"]  # once: cached
