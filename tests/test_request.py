"""One request's rules, written and run once: sizes rounded and said so, the schema as the
one validation on the way in, the engine checking with the same code at its own bounds."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from magicmix.errors import InvalidInput
from magicmix.request import MixParams, MixRequest, validate_request, validated
from tests.http_fixtures import LoopbackServer
from tests.service_fixtures import RunningService

FAST = {"steps": 2, "seed": 1}


def test_a_size_off_the_8_pixel_grid_runs_rounded_down_and_meta_says_both(
    running: RunningService, image_host: LoopbackServer
) -> None:
    reply = running.mix(image=image_host.url("/layout.png"), width=300, height=270, **FAST)
    assert reply.status_code == 200, reply.text
    done = running.wait_success(reply.json()["id"])
    meta = done["meta"]
    assert (meta["W"], meta["H"], meta["W_requested"], meta["H_requested"]) == (296, 264, 300, 270)
    image = Image.open(io.BytesIO(running.download(done["output"][0])))
    assert image.size == (296, 264)


def test_no_size_asked_runs_the_native_size_and_meta_says_none_was_asked(
    running: RunningService, image_host: LoopbackServer
) -> None:
    body = {"image": image_host.url("/layout.png"), **FAST}
    reply = running.mix(**body, width=None, height=None)
    done = running.wait_success(reply.json()["id"])
    assert (done["meta"]["W"], done["meta"]["H"]) == (768, 768)  # SD 1.x's native size
    assert "W_requested" not in done["meta"] and "H_requested" not in done["meta"]


def test_a_schedule_with_no_step_to_run_is_refused_before_the_image_is_fetched(
    running: RunningService, image_host: LoopbackServer
) -> None:
    """The engine's last own rule (int(kmax * steps) >= 1) is the schema's now: checked once,
    up front, instead of after the fetch and the decode."""
    watch = image_host.watch("/layout.png")
    reply = running.mix(image=image_host.url("/layout.png"), kmin=0, kmax=0.04, steps=20)
    assert reply.status_code == 422 and "no denoising step" in reply.json()["errors"]["kmax"]
    assert not watch.entered.is_set()


@pytest.mark.parametrize(
    "values",
    [
        {"kmin": 0, "kmax": 0.04, "steps": 20},
        {"kmin": 0.6, "kmax": 0.5},
        {"mix_factor": 1.5},
        {"steps": True},
    ],
)
def test_the_engine_refuses_with_the_schemas_own_rules_and_words(values: dict[str, object]) -> None:
    with pytest.raises(InvalidInput) as by_schema:
        validated(MixParams, {"prompt": "p", **values})
    with pytest.raises(InvalidInput) as by_engine:
        validate_request(MixRequest(Image.new("RGB", (8, 8)), "p", **values))  # type: ignore[arg-type]
    assert (by_engine.value.field, by_engine.value.message) == (
        by_schema.value.field,
        by_schema.value.message,
    )


def test_the_engine_keeps_its_wider_bounds_for_library_callers() -> None:
    """64 px and 100 steps are not the API's, but a test or a benchmark may run them."""
    validate_request(MixRequest(Image.new("RGB", (8, 8)), "p", width=64, height=64, steps=100))
    with pytest.raises(InvalidInput, match="multiple of 8") as refused:
        validate_request(MixRequest(Image.new("RGB", (8, 8)), "p", width=60, height=64))
    assert refused.value.field == "width"
