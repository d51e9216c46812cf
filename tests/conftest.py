"""Shared fixtures: the tiny model, a loaded engine, layout images. All offline."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from magicmix.engine import MagicMixEngine
from magicmix.engine.builder import build_random_model
from magicmix.logs import install_redaction

pytest_plugins: list[str] = ["tests.s3_server", "tests.service_fixtures", "tests.db_fixtures"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny model, built once per test session."""
    return build_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> MagicMixEngine:
    """One engine on the tiny model, shared: loading costs more than a mix."""
    return MagicMixEngine.load(str(tiny_model_dir), data_dir=tiny_model_dir.parent, device="cpu")


def make_layout_image(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A deterministic picture with structure (gradients and a block), not flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture
def raw_log_records() -> Iterator[None]:
    """Log records as our code makes them. `magicmix.logs.install_redaction` (through
    `configure_logging`, which `build_local_service` runs: every test that serves the app)
    replaces the process's record factory for good: from then on every record is redacted,
    and a line of ours that leaks a URL passes unseen in any test file run after that."""
    install_redaction()  # as another test file would have: the test must not depend on it
    previous = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


@pytest.fixture
def layout_image() -> Image.Image:
    return make_layout_image()


def run_cli(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str) -> Result:
    """`magicmix ARGS` in this process with `env` set: the same command as a subprocess
    without paying torch's import again (settings are re-read before and after)."""
    from magicmix.cli import app
    from magicmix.config import get_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        get_settings.cache_clear()
