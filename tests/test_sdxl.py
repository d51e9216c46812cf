"""SDXL: the tiny SDXL-architecture model through the engine, the HTTP API and the CLI.

Also family detection, the per-family default size, device resolution for Apple's GPU
(logic only: there is no MPS device here; `torch.backends.mps.is_available` is the
stand-in), and ModelsLab's full reply (`proxy_links`, whole-second `eta`).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from magicmix.engine import MagicMixEngine
from magicmix.engine.builder import build_random_model
from magicmix.engine.loading import resolve_device, resolve_dtype
from magicmix.families import SD1, SDXL, detect_family, resolve_family
from magicmix.http.schemas import SEED_EXAMPLE
from magicmix.request import MixRequest
from tests.conftest import make_layout_image, run_cli
from tests.http_fixtures import LoopbackServer, respond
from tests.service_fixtures import API, RunningService, png, serve, service_settings


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> MagicMixEngine:
    return MagicMixEngine.load(str(sdxl_dir), data_dir=sdxl_dir.parent, device="cpu")


def request(**overrides: Any) -> MixRequest:
    values: dict[str, Any] = {
        "image": make_layout_image(),
        "prompt": "a red circle",
        "width": 256,
        "height": 256,
        "steps": 10,
        "seed": 3,
    }
    return MixRequest(**{**values, **overrides})


# -- families -----------------------------------------------------------------------------


def test_the_family_is_read_from_the_folder(sdxl_dir: Path, tiny_model_dir: Path) -> None:
    assert detect_family(str(sdxl_dir)) is SDXL
    assert detect_family(str(tiny_model_dir)) is SD1
    assert detect_family("tiny") is detect_family("toy") is SD1
    assert detect_family("nobody/not-in-the-cache") is None
    assert resolve_family("nobody/not-in-the-cache") is SD1
    assert resolve_family(str(tiny_model_dir), "sdxl") is SDXL  # configured wins


def test_the_engine_loads_what_its_family_names(
    sdxl: MagicMixEngine, engine: MagicMixEngine
) -> None:
    assert sdxl.describe()["family"] == "sdxl" and engine.describe()["family"] == "sd1"
    parts = sdxl.components
    assert parts.family is SDXL and len(parts.text_encoders) == len(parts.tokenizers) == 2
    assert [type(e).__name__ for e in parts.text_encoders] == [
        "CLIPTextModel",
        "CLIPTextModelWithProjection",  # as the checkpoint's model_index.json names it
    ]
    assert parts.vae.config.scaling_factor == pytest.approx(SDXL.vae_scale)
    assert sdxl.vae_scale_factor == SDXL.latent_factor == engine.vae_scale_factor


# -- the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "kmin", "kmax", "calls", "mixed"), [(10, 0.3, 0.5, 5, 2)])
def test_unet_calls_and_mixing_follow_algorithm_1(
    sdxl: MagicMixEngine,
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
    kmin: float,
    kmax: float,
    calls: int,
    mixed: int,
) -> None:
    import magicmix.engine.pipeline as pipeline

    mixes: list[int] = []
    real = pipeline.mix_latents
    monkeypatch.setattr(pipeline, "mix_latents", lambda *a: mixes.append(1) or real(*a))
    before = sdxl.unet_calls
    sdxl.mix([request(steps=steps, kmin=kmin, kmax=kmax)], progress=False)
    assert (sdxl.unet_calls - before, len(mixes)) == (calls, mixed)


def test_sdxl_conditioning_reaches_the_unet(
    sdxl: MagicMixEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    unet = sdxl.components.denoiser
    real = unet.forward

    def spy(sample: torch.Tensor, t: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(sample, t, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    sdxl.mix([request(width=256, height=320, negative_prompt="")], progress=False)
    extras = seen[0]["added_cond_kwargs"]
    assert extras["time_ids"].tolist() == [[320, 256, 0, 0, 320, 256]] * 2
    assert seen[0]["encoder_hidden_states"].shape == (2, 77, 64)  # both encoders side by side
    uncond, cond = extras["text_embeds"]
    assert torch.count_nonzero(uncond) == 0 and torch.count_nonzero(cond) > 0  # zeros for ""


def test_same_seed_same_image_and_batching_matches_alone(sdxl: MagicMixEngine) -> None:
    a, b = request(seed=5), request(seed=6, prompt="a blue square", negative_prompt="green")
    alone = [sdxl.mix([r], progress=False)[0].image for r in (a, b)]
    again = sdxl.mix([a], progress=False)[0].image
    assert again.tobytes() == alone[0].tobytes()
    together = [r.image for r in sdxl.mix([a, b], progress=False)]
    for left, right in zip(alone, together, strict=True):
        diff = torch.tensor(list(left.getdata())) - torch.tensor(list(right.getdata()))
        assert int(diff.abs().max()) <= 2  # batched kernels differ by rounding only
    assert alone[0].tobytes() != alone[1].tobytes()


def test_the_fp16_path_keeps_the_vae_in_fp32(sdxl_dir: Path) -> None:
    half = MagicMixEngine.load(
        str(sdxl_dir), data_dir=sdxl_dir.parent, device="cpu", dtype="float16"
    )
    assert half.components.denoiser.dtype == torch.float16
    assert half.components.vae.dtype == torch.float32  # force_upcast: SDXL's VAE overflows
    (result,) = half.mix([request(steps=4)], progress=False)
    assert result.image.size == (256, 256)


# -- devices (logic only: no Apple GPU here) --------------------------------------------


def test_mps_is_picked_when_present_and_refused_when_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") == resolve_device("mps")
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="MPS"):
        resolve_device("mps")


def test_noise_comes_from_cpu_generators_whatever_the_device(sdxl: MagicMixEngine) -> None:
    generator = torch.Generator("cpu").manual_seed(9)
    noise = sdxl._noise([generator], torch.zeros(1, 4, 8, 8))
    assert torch.equal(
        noise, torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(9))[None]
    )


# -- HTTP and CLI -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_service(
    tmp_path_factory: pytest.TempPathFactory, sdxl_dir: Path
) -> Iterator[RunningService]:
    settings = service_settings(tmp_path_factory.mktemp("sdxl"), sdxl_dir, sync_wait_s=120)
    with serve(settings) as running:
        yield running


def test_the_seed_body_with_an_sdxl_model_answers_a_png(sdxl_service: RunningService) -> None:
    with LoopbackServer() as host:
        host.route(
            "/a.jpg", respond(200, png(make_layout_image(), "JPEG"), {"Content-Type": "image/jpeg"})
        )
        body = {**SEED_EXAMPLE, "key": sdxl_service.key, "image": host.url("/a.jpg")}
        reply = sdxl_service.post(f"{API}/image_editing/magic_mix", body).json()
    assert reply["status"] == "success", reply
    assert reply["proxy_links"] == reply["output"]
    image = Image.open(__import__("io").BytesIO(sdxl_service.download(reply["output"][0])))
    assert (image.format, image.size) == ("PNG", (768, 768))
    details = sdxl_service.post(f"{API}/image_editing/system_details", {"key": sdxl_service.key})
    assert details.json()["family"] == "sdxl"


def test_sdxl_requests_default_to_1024(sdxl_service: RunningService) -> None:
    layout = base64.b64encode(png(make_layout_image(64, 64))).decode()
    body = {"key": sdxl_service.key, "prompt": "p", "image": layout, "steps": 2, "seed": 1}
    reply = sdxl_service.post(f"{API}/image_editing/magic_mix", body).json()
    assert reply["status"] == "success", reply
    assert (reply["meta"]["W"], reply["meta"]["H"]) == (1024, 1024)


def test_processing_replies_carry_proxy_links_and_a_whole_eta(sdxl_service: RunningService) -> None:
    sdxl_service.service.settings.sync_wait_s = 0
    try:
        layout = base64.b64encode(png(make_layout_image(64, 64))).decode()
        body = {
            "key": sdxl_service.key,
            "prompt": "p",
            "image": layout,
            "width": 256,
            "height": 256,
        }
        reply = sdxl_service.post(f"{API}/image_editing/magic_mix", body).json()
    finally:
        sdxl_service.service.settings.sync_wait_s = 120
    assert reply["status"] == "processing", reply
    assert isinstance(reply["eta"], int) and reply["proxy_links"] == reply["future_links"]
    sdxl_service.wait_success(reply["id"])


def test_the_cli_mixes_with_an_sdxl_model(
    sdxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = tmp_path / "layout.png"
    make_layout_image().save(layout)
    out = tmp_path / "out.png"
    env = {"MAGICMIX_MODEL": str(sdxl_dir), "MAGICMIX_DEVICE": "cpu"}
    env["MAGICMIX_DATA_DIR"] = str(tmp_path / "data")
    args = ["--image", str(layout), "--prompt", "a red circle", "--out", str(out), "--seed", "2"]
    done = run_cli(monkeypatch, env, "mix", *args, "--width", "256", "--height", "256")
    assert done.exit_code == 0, done.output
    assert Image.open(out).size == (256, 256)
