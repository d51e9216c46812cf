"""The shipped toy model: its files are what the manifest says, its training code runs and is
deterministic, and the toy world is what the captions claim. (What MagicMix does with it is
in test_semantics.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from magicmix.config import Settings
from magicmix.engine import MagicMixEngine
from magicmix.engine.loading import resolve_model_source
from magicmix.engine.toy import (
    MODEL_DIR,
    ToyModelError,
    read_manifest,
    verified_model_dir,
    world,
    write_manifest,
)
from magicmix.engine.toy.train import Recipe, build_tokenizer, train_toy_model
from magicmix.request import MixRequest

# What a training run in the default suite may cost: every phase, a handful of steps.
SMOKE = Recipe(
    vae_steps=2,
    vae_batch=2,
    scale_images=2,
    text_steps=2,
    unet_images=(8, 4),
    unet_batches=(2, 1),
    unet_steps=3,
)


def test_the_toy_model_is_the_local_default_and_ships_in_the_package() -> None:
    assert Settings().model == "toy"
    assert resolve_model_source("toy", Path("/nonexistent")) == str(MODEL_DIR)
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"the shipped toy model is {size / 2**20:.1f} MiB"


def test_every_shipped_file_matches_its_manifest() -> None:
    manifest = read_manifest(MODEL_DIR)
    assert {"unet/diffusion_pytorch_model.safetensors", "model_index.json"} <= set(manifest)
    assert verified_model_dir() == MODEL_DIR


@pytest.mark.parametrize("damage", ["edit", "delete", "add"])
def test_a_damaged_copy_is_refused_before_it_loads(tmp_path: Path, damage: str) -> None:
    copy = Path(shutil.copytree(MODEL_DIR, tmp_path / "toy"))
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "edit":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1  # one bit of one weight
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (copy / "unet" / "extra.bin").write_bytes(b"x")
    expected = {"edit": "do not match", "delete": "missing", "add": "does not list"}[damage]
    with pytest.raises(ToyModelError, match=expected):
        verified_model_dir(copy)


def test_training_runs_end_to_end_and_is_deterministic(tmp_path: Path) -> None:
    """Every phase of `build-toy` on a few steps: two runs give the same files, and the
    result loads and mixes in the engine."""
    threads = torch.get_num_threads()
    first = dict(train_toy_model(tmp_path / "a", recipe=SMOKE, progress=False))
    assert torch.get_num_threads() == threads  # the recipe's count was for training only
    train_toy_model(tmp_path / "b", recipe=SMOKE, progress=False)
    assert read_manifest(tmp_path / "a") == read_manifest(tmp_path / "b")
    assert set(first) >= {"vae_s", "latents_s", "text_s", "diffusion_s", "total_s"}
    assert verified_model_dir(tmp_path / "a")
    engine = MagicMixEngine.load(str(tmp_path / "a"), data_dir=tmp_path, device="cpu")
    layout = world.render(world.Shape("green", "square", 0.3, 0.3, 0.3), 256)
    (result,) = engine.mix(
        [MixRequest(image=layout, prompt="a red circle", width=256, height=256, steps=4, seed=1)],
        progress=False,
    )
    assert result.image.size == (256, 256)


def test_a_manifest_lists_every_file_once(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    (tmp_path / "b.txt").write_text("b")
    digests = write_manifest(tmp_path)
    assert list(digests) == ["b.txt", "sub/a.json"]
    assert read_manifest(tmp_path) == digests


def test_the_world_is_deterministic_and_covers_every_colour_and_shape() -> None:
    specs = [world.sample_spec(0, i) for i in range(200)]
    assert specs == [world.sample_spec(0, i) for i in range(200)]
    assert {s.colour for s in specs} == set(world.COLOURS)
    assert {s.shape for s in specs} == set(world.SHAPES)
    for spec in specs[:24]:
        image = world.render(spec, 128)
        assert world.dominant_colour(image) == spec.colour, spec
        assert world.centroid_distance(world.render(spec, 256), image) < 0.03
        assert spec.caption == f"a {spec.colour} {spec.shape}"


def test_the_measurements_read_layout_and_content_off_the_pixels() -> None:
    square = world.render(world.Shape("green", "square", 0.25, 0.25, 0.3), 256)
    moved = world.render(world.Shape("green", "square", 0.75, 0.25, 0.3), 256)
    recoloured = world.render(world.Shape("red", "square", 0.25, 0.25, 0.3), 256)
    assert world.centroid_distance(square, moved) == pytest.approx(0.5, abs=0.01)
    assert world.mask_iou(square, recoloured) == pytest.approx(1.0)
    assert world.colour_shares(recoloured)["red"] > 0.95
    assert world.colour_shares(square)["green"] > 0.95
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert world.centroid(blank) is None and world.dominant_colour(blank) is None


def test_every_caption_word_is_one_token() -> None:
    tokenizer = build_tokenizer()
    for word in [*world.COLOURS, *world.SHAPES]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
    assert tokenizer("a red circle").input_ids == tokenizer("A  Red circle").input_ids
