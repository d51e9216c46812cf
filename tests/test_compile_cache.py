"""The compile cache: keyed by everything that changes compiled code; a bad one is ignored.

The fast tests work on cache directories directly (no compiling: that takes minutes on
a CPU). The slow one compiles the tiny model in fresh processes, from scratch and from the
cache, and asserts identical PNG bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magicmix.engine.compile_cache import MANIFEST, CompileCache, CompileKey, model_label

KEY = CompileKey(
    torch_version="2.13.0+cpu",
    device="cpu x86_64",
    model="folder:abc",
    dtype="torch.float32",
    sizes=((256, 256),),
    buckets=(1, 2),
    options="EngineOptions(compile=True)",
)


@pytest.mark.parametrize(
    "change",
    [
        {"torch_version": "2.14.0"},
        {"device": "cuda NVIDIA H200 sm90"},
        {"model": "folder:def"},
        {"dtype": "torch.float16"},
        {"sizes": ((768, 768),)},
        {"buckets": (1, 2, 4)},
        {"options": "EngineOptions(compile=True, cuda_graphs=True)"},
    ],
)
def test_the_key_changes_with_every_input_to_compilation(change: dict[str, object]) -> None:
    assert dataclasses.replace(KEY, **change).digest != KEY.digest  # type: ignore[arg-type]
    assert dataclasses.replace(KEY).digest == KEY.digest


def test_a_folder_model_is_keyed_by_its_content(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.bin").write_bytes(b"one")
    first = model_label(str(model), None)
    (model / "unet" / "weights.bin").write_bytes(b"two")
    assert model_label(str(model), None) != first
    assert model_label("org/model", "abc") == "org/model@abc"


@pytest.fixture(autouse=True)
def own_inductor_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """`activate` points torch at a directory: this test's change is undone after it."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def fill(cache: CompileCache, key: CompileKey) -> Path:
    """What a warm-up leaves: some cache files in the key's live directory, then publish."""
    assert cache.activate(key) is False
    live = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    (live / "fxgraph").mkdir()
    (live / "fxgraph" / "entry").write_bytes(b"compiled graph")
    (live / "kernel.so").write_bytes(b"\x7fELF kernel")
    return cache.publish(key)


def test_missing_then_published_then_found(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path / "store")
    stored = fill(cache, KEY)
    assert json.loads((stored / MANIFEST).read_text()) == {
        "fxgraph/entry": hashlib.sha256(b"compiled graph").hexdigest(),
        "kernel.so": hashlib.sha256(b"\x7fELF kernel").hexdigest(),
    }
    assert cache.activate(KEY) is True
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(stored)
    assert (stored / "kernel.so").read_bytes() == b"\x7fELF kernel"
    other = dataclasses.replace(KEY, buckets=(1,))
    assert cache.activate(other) is False  # another key: another directory


def test_a_separate_work_dir_is_seeded_from_the_store(tmp_path: Path) -> None:
    """As on Modal: the Volume is the store, the container's disk the work dir."""
    fill(CompileCache(tmp_path / "volume", tmp_path / "first-container"), KEY)
    second = CompileCache(tmp_path / "volume", tmp_path / "second-container")
    assert second.activate(KEY) is True
    live = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert live == tmp_path / "second-container" / KEY.digest
    assert (live / "fxgraph" / "entry").read_bytes() == b"compiled graph"


@pytest.mark.parametrize("damage", ["altered", "missing file", "no manifest", "bad manifest"])
def test_a_damaged_cache_is_wiped_and_compiled_again(tmp_path: Path, damage: str) -> None:
    cache = CompileCache(tmp_path / "store")
    stored = fill(cache, KEY)
    if damage == "altered":
        (stored / "kernel.so").write_bytes(b"\x7fELF truncat")
    elif damage == "missing file":
        (stored / "fxgraph" / "entry").unlink()
    elif damage == "no manifest":
        (stored / MANIFEST).unlink()
    else:
        (stored / MANIFEST).write_text("{not json")
    assert cache.activate(KEY) is False
    assert list(stored.iterdir()) == []  # wiped: torch starts from an empty directory


@pytest.mark.slow
def test_outputs_from_the_cache_are_the_compiled_outputs(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Compile in a fresh process, then again from the cache: the same PNG bytes."""
    code = (
        "import hashlib, sys\n"
        "from PIL import Image\n"
        "from magicmix.config import Settings\n"
        "from magicmix.engine.configure import load_engine\n"
        "from magicmix.inputs.images import png_bytes\n"
        "from magicmix.request import MixRequest\n"
        "engine = load_engine(Settings(compile=True, compile_sizes='256x256', batch_size=1))\n"
        "image = Image.new('RGB', (256, 256), (40, 120, 200))\n"
        "(result,) = engine.mix([MixRequest(image=image, prompt='Bed', width=256, height=256,"
        " steps=10, seed=4)], progress=False)\n"
        "print(hashlib.sha256(png_bytes(result.image)).hexdigest())\n"
    )
    env = {
        **os.environ,
        "MAGICMIX_MODEL": str(tiny_model_dir),
        "MAGICMIX_DEVICE": "cpu",
        "MAGICMIX_DATA_DIR": str(tmp_path / "data"),
        "MAGICMIX_COMPILE_CACHE_DIR": str(tmp_path / "cache"),
    }
    digests = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        digests.append(done.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one key, published once
