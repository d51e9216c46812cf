"""MagicMix's algorithm on the trained toy model, measured on the pixels.

Each test reads layout (where the object is) and content (what colour it is) off the output
image, so each one fails when a piece of Algorithm 1 breaks: `scripts/sabotage.py` breaks
them one at a time in a copy of the repo and lists the tests that caught each one.

Layout: a green square in the top-left; prompt "a red circle", the issue's case. A second
case (a yellow triangle in the centre, "a blue square") guards against a model that only
learnt one recolouring. Defaults are the service's (kmin 0.3, kmax 0.5, mix_factor 0.5,
20 steps, guidance 7.5) at 256 px.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from magicmix.engine import MagicMixEngine
from magicmix.engine.toy import verified_model_dir, world
from magicmix.request import MixRequest

GREEN_SQUARE = world.Shape("green", "square", 0.28, 0.28, 0.32)
YELLOW_TRIANGLE = world.Shape("yellow", "triangle", 0.5, 0.45, 0.42)
PRIMARY = "green-square-to-red-circle"
CASES = {
    PRIMARY: (GREEN_SQUARE, "a red circle"),
    "yellow-triangle-to-blue-square": (YELLOW_TRIANGLE, "a blue square"),
}
SEEDS = (1, 2, 3)

CENTROID_MAX = 0.06  # output object's centre within 6% of the side from the layout's
IOU_MIN = 0.4  # and it overlaps the layout's object
PROMPT_SHARE_MIN = 0.6  # the prompt's colour is most of the object...
LAYOUT_SHARE_MAX = 0.2  # ...and the layout's colour little of it
KNOB_MARGIN = 0.5  # a knob that turns content on adds this much prompt colour share
NEGATIVE_MARGIN = 0.3  # naming the colour in the negative prompt takes this much away
KMAX_VALUES = (0.3, 0.5, 0.7, 0.9)
RENOISE_TOLERANCE = 0.2


@pytest.fixture(scope="module")
def toy() -> MagicMixEngine:
    return MagicMixEngine.load(str(verified_model_dir()), data_dir=Path("."), device="cpu")


@cache
def _mix(engine: MagicMixEngine, spec: world.Shape, prompt: str, fields: tuple) -> Image.Image:
    values: dict[str, Any] = {"width": 256, "height": 256, "seed": SEEDS[0], **dict(fields)}
    layout = world.render(spec, values["width"])
    (result,) = engine.mix([MixRequest(image=layout, prompt=prompt, **values)], progress=False)
    return result.image


def mix(engine: MagicMixEngine, case: str, **fields: Any) -> tuple[Image.Image, Image.Image]:
    """(layout, output) for a case, at the service's defaults but for `fields`."""
    spec, prompt = CASES[case]
    output = _mix(engine, spec, prompt, tuple(sorted(fields.items())))
    return world.render(spec, output.width), output


def shares(engine: MagicMixEngine, case: str, **fields: Any) -> tuple[float, float]:
    """(prompt colour share, layout colour share) of the output object."""
    spec, prompt = CASES[case]
    colours = world.colour_shares(mix(engine, case, **fields)[1])
    return colours[prompt.split()[1]], colours[spec.colour]


def distance(engine: MagicMixEngine, case: str, **fields: Any) -> float:
    return world.pixel_distance(*mix(engine, case, **fields))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_layout_is_kept(toy: MagicMixEngine, case: str, seed: int) -> None:
    layout, output = mix(toy, case, seed=seed)
    assert world.centroid_distance(layout, output) <= CENTROID_MAX
    assert world.mask_iou(layout, output) >= IOU_MIN


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_content_is_the_prompts(toy: MagicMixEngine, case: str, seed: int) -> None:
    prompt_share, layout_share = shares(toy, case, seed=seed)
    assert prompt_share >= PROMPT_SHARE_MIN, (prompt_share, layout_share)
    assert layout_share <= LAYOUT_SHARE_MAX, (prompt_share, layout_share)


@pytest.mark.parametrize("size", [512])
def test_layout_and_content_hold_at_larger_sizes(toy: MagicMixEngine, size: int) -> None:
    layout, output = mix(toy, PRIMARY, width=size, height=size)
    assert output.size == (size, size)
    assert world.centroid_distance(layout, output) <= CENTROID_MAX
    prompt_share, layout_share = shares(toy, PRIMARY, width=size, height=size)
    assert prompt_share >= PROMPT_SHARE_MIN and layout_share <= LAYOUT_SHARE_MAX


def mean_distance(engine: MagicMixEngine, case: str, **fields: Any) -> float:
    return sum(distance(engine, case, seed=s, **fields) for s in SEEDS) / len(SEEDS)


def test_a_lower_kmax_stays_closer_to_the_layout(toy: MagicMixEngine) -> None:
    """kmax is where the run starts: the higher, the noisier the start and the further the
    output from the layout. With mix_factor 0.9 the layout phase pulls weakly, so the
    start shows (at 0.5 it pulls every run back to nearly the same place)."""
    distances = [mean_distance(toy, PRIMARY, kmin=0.3, kmax=k, mix_factor=0.9) for k in KMAX_VALUES]
    assert distances == sorted(distances), dict(zip(KMAX_VALUES, distances, strict=True))
    assert distances[-1] > 1.25 * distances[0], distances


@pytest.mark.parametrize("case", CASES)
def test_a_higher_mix_factor_gives_more_content(toy: MagicMixEngine, case: str) -> None:
    """kmin = 0: the layout phase runs to the end, so mix_factor alone decides how much of
    the prompt gets in: the output moves away from the layout and takes the prompt's colour."""
    knob = {"kmin": 0.0, "kmax": 0.5}
    assert distance(toy, case, mix_factor=0.1, **knob) < distance(toy, case, mix_factor=0.9, **knob)
    low, high = (
        shares(toy, case, mix_factor=0.1, **knob)[0],
        shares(toy, case, mix_factor=0.9, **knob)[0],
    )
    assert high - low >= KNOB_MARGIN, (low, high)


@pytest.mark.parametrize("case", CASES)
def test_kmin_decides_how_much_content_phase_runs(toy: MagicMixEngine, case: str) -> None:
    """kmin = kmax: all content phase (the prompt's colour); kmin = 0: all layout phase
    (the layout's colour, nearly as it was)."""
    content, _ = shares(toy, case, kmin=0.5, kmax=0.5)
    layout_only, kept = shares(toy, case, kmin=0.0, kmax=0.5)
    assert content - layout_only >= KNOB_MARGIN, (content, layout_only)
    assert kept >= 0.4, kept
    assert distance(toy, case, kmin=0.0, kmax=0.5) < distance(toy, case, kmin=0.5, kmax=0.5)


def test_guidance_uses_the_negative_prompt(toy: MagicMixEngine) -> None:
    plain = shares(toy, PRIMARY, negative_prompt="")[0]
    against = shares(toy, PRIMARY, negative_prompt="a red")[0]
    assert plain - against >= NEGATIVE_MARGIN, (plain, against)


@pytest.mark.parametrize(("kmax", "kmin"), [(1.0, 0.5), (0.75, 0.25)])
def test_the_layout_is_mixed_in_at_the_next_steps_noise(
    toy: MagicMixEngine, kmax: float, kmin: float
) -> None:
    """With mix_factor 0 every layout step is replaced by the layout noised to t-1, so the
    content phase starts from the layout noised to kmin's step: as far from the layout, over
    seeds, as a run that starts there (kmax = kmin). Mixing at any other t breaks this; 4
    steps of 250 make an off-by-one step visible (at 20 steps of 50 it hides in the noise)."""
    seeds = range(11, 17)
    common = {"steps": 4, "kmin": kmin}
    layout_phase = [
        distance(toy, PRIMARY, seed=s, mix_factor=0.0, kmax=kmax, **common) for s in seeds
    ]
    started_there = [distance(toy, PRIMARY, seed=s, kmax=kmin, **common) for s in seeds]
    a, b = sum(layout_phase) / len(seeds), sum(started_there) / len(seeds)
    assert abs(a - b) <= RENOISE_TOLERANCE * b, (a, b)
