"""One capacity model: the queue limit follows from GPUs, speed and minutes, everywhere.

The same settings shape the local worker, the Modal containers (through the deploy-time
environment `modal_app.py` bakes into the images) and `magicmix plan`'s defaults.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from magicmix.backends.local.compose import build_local_service
from magicmix.backends.modal import compose
from magicmix.capacity import queue_limit, seconds_per_image
from magicmix.config import Settings
from magicmix.families import SD1, SDXL
from tests.deploy_probe import deployed

ROOT = Path(__file__).resolve().parent.parent


def test_the_queue_holds_minutes_of_work_at_full_scale() -> None:
    settings = Settings(gpu="H200", max_gpus=8, queue_minutes=5)
    assert settings.max_queue == queue_limit(
        max_gpus=8, seconds_per_image=seconds_per_image("H200"), queue_minutes=5
    )
    assert settings.max_queue == pytest.approx(8 * 300 / 0.23, rel=0.001)
    assert settings.max_queued_per_key == settings.max_queue  # one tenant by default
    assert Settings(max_queue=64, max_queued_per_key=32).max_queued_per_key == 32
    assert Settings(gpu="H200", max_gpus=16).max_queue > settings.max_queue


def test_the_settings_shape_the_local_worker(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = Settings(
        model=str(tiny_model_dir),
        data_dir=tmp_path,
        secret_key="s" * 32,
        max_gpus=2,
        seconds_per_image=1.0,
        queue_minutes=1,
        batch_size=3,
        batch_wait_ms=40,
    )
    service = build_local_service(settings)
    assert service.lifecycle.limits.max_queue == 120 == settings.max_queue
    worker = service.dispatcher
    assert worker._batch_size == 3 and worker._batch_wait_s == 0.04  # type: ignore[attr-defined]


def test_the_settings_shape_the_modal_containers(tmp_path: Path, pg_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path,
        secret_key="s" * 32,
        store_url="s3://bucket/outputs/",
        database_url=pg_url,
        gpu="H100",
        max_gpus=6,
    )
    parts = compose.modal_parts(settings, lambda: None, pool=compose.POOLS["web"])
    assert parts.lifecycle.limits.max_queue == settings.max_queue
    assert parts.lifecycle.limits.max_per_key == settings.max_queued_per_key


def test_the_deploy_time_knobs_reach_the_containers_settings() -> None:
    """What `modal deploy` bakes into the images is what a container's Settings derive from."""
    gpu, gpus, batch, wait, max_queue = deployed("capacity")["settings"]
    assert (gpu, gpus, batch, wait) == ("H200", 8, SD1.batch_size, 50)
    assert max_queue == Settings(gpu="H200", max_gpus=8).max_queue
    assert deployed("capacity")["family"] == ["sd1", SD1.batch_size, "sd1", SD1.batch_size]


def test_an_sdxl_deploy_batches_and_queues_as_its_family_says() -> None:
    """The model id names the family on the laptop; the containers size by it."""
    assert deployed("sdxl")["family"] == ["sdxl", SDXL.batch_size, "sdxl", SDXL.batch_size]
    *_, max_queue = deployed("sdxl")["settings"]
    assert max_queue == Settings(gpu="H200", max_gpus=8, model_family="sdxl").max_queue
    assert max_queue < deployed("capacity")["settings"][-1] / 3  # 4x the GPU time per image
