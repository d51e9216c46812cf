"""`modal_app.py` imports offline and declares what the deployment needs.

Read from Modal's local function definitions only; nothing here calls Modal's servers.
Autoscaling and snapshot settings are not in Modal's public `FunctionInfo`, so they are
read from the loader's closure (`_declared`): private to modal 1.6, re-check on upgrades.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import modal
import pytest
from modal._utils.async_utils import synchronizer

import modal_app
from tests.deploy_probe import deployed

ROOT = Path(__file__).resolve().parent.parent


def _declared(function: modal.Function) -> dict[str, Any]:
    """The options `@app.cls` / `@app.function` captured for deploy time."""
    load = synchronizer._translate_in(function)._load
    return dict(
        zip(load.__code__.co_freevars, (c.cell_contents for c in load.__closure__), strict=True)
    )


# modal_app run as on a laptop with `modal` and the checkout alone (scripts/deploy-check)
ON_A_LAPTOP = runpy.run_path(str(ROOT / "scripts" / "deploy-check"))["ON_A_LAPTOP"]
LAPTOP = (
    ON_A_LAPTOP
    + r"""
import modal_app
gpu = modal_app.MagicMix._get_class_service_function().info().gpus
ours = sorted(m for m in sys.modules if m.split(".")[0] == "magicmix")
print(json.dumps([modal_app.GPU, gpu, modal_app.FAMILY.name, modal_app.BATCH_SIZE, ours,
                  "pydantic" in hidden and "torch" in hidden]))
"""
)


@pytest.mark.parametrize(
    ("model", "family", "batch"),
    [("", "sd1", 8), ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 4)],
)
def test_import_needs_no_credentials_network_or_project_deps(
    tmp_path: Path, model: str, family: str, batch: int
) -> None:
    """As on a laptop with only `modal` installed and no Modal token; the model family
    (from the model id) and its batch size come from `magicmix.families` alone."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MAGICMIX_GPU": "h100"}
    if model:
        env["MAGICMIX_MODEL"] = model
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", LAPTOP],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    gpu, gpus, seen_family, seen_batch, ours, hidden = json.loads(done.stdout)
    assert (gpu, gpus) == ("h100", [["H100", 1]])
    assert (seen_family, seen_batch) == (family, batch)
    # what ran of ours: the families, and the packages above the modules that the images'
    # `imports()` blocks tried (they need the project's dependencies: skipped here)
    assert ours == ["magicmix", "magicmix.backends", "magicmix.backends.modal", "magicmix.families"]
    assert hidden


def test_gpu_class_loads_once_from_the_volume_and_scales_to_zero() -> None:
    gpu = modal_app.MagicMix._get_class_service_function()
    info = gpu.info()
    assert info.gpus == [(modal_app.GPU.upper(), 1)]
    assert info.volumes[modal_app.CACHE_DIR].name == "magicmix-weights"
    assert "Secret.from_dict([HF_HUB_OFFLINE])" in info.secrets
    assert info.batching_info is not None
    assert info.batching_info.max_batch_size == modal_app.BATCH_SIZE
    assert info.batching_info.wait_ms == modal_app.BATCH_WAIT_MS
    assert list(modal_app.MagicMix._get_method_names()) == ["run"]
    declared = _declared(gpu)
    assert declared["enable_memory_snapshot"] is True
    assert declared["experimental_options"] in ({}, None)  # the GPU snapshot is opt-in
    autoscaling = declared["autoscaler_settings"]
    assert autoscaling.scaledown_window == modal_app.GPU_IDLE_S == 30
    assert autoscaling.max_containers == modal_app.MAX_GPUS
    assert not autoscaling.min_containers
    assert declared["retry_policy"].retries == 2  # a crashed container's batch runs again
    volumes = dict(declared["validated_volumes_no_cloud_buckets"])
    assert volumes[modal_app.CACHE_DIR]._mount_options.read_only  # weights: only read here
    compile_volume = volumes[modal_app.COMPILE_DIR]  # the compile cache: written on a miss
    assert not (compile_volume._mount_options and compile_volume._mount_options.read_only)
    assert synchronizer._translate_in(modal_app.gpu_image) is declared["image"]


def test_every_cpu_function_uses_the_torch_free_image() -> None:
    web_image = synchronizer._translate_in(modal_app.web_image)
    for function in (
        modal_app.web,
        modal_app.send_webhooks,
        modal_app.sweep,
        modal_app.manage_keys,
        modal_app.download_weights,
    ):
        assert _declared(function)["image"] is web_image, function
        assert function.info().gpus == []
    lock = (ROOT / "requirements" / "image-web.txt").read_text()
    assert "torch" not in lock and "diffusers" not in lock and "transformers" not in lock
    assert "torch==" in (ROOT / "requirements" / "image-gpu.txt").read_text()


def test_web_function_serves_the_asgi_app_with_a_snapshot() -> None:
    info = modal_app.web.info()
    assert info.web_info is not None
    assert synchronizer._translate_in(modal_app.web)._webhook_config.type == 1  # ASGI app
    assert "modal.Secret.from_name('magicmix')" in info.secrets
    assert _declared(modal_app.web)["enable_memory_snapshot"] is True


def test_download_sweep_webhooks_and_keys_are_declared() -> None:
    download = modal_app.download_weights.info()
    assert download.volumes[modal_app.CACHE_DIR].name == "magicmix-weights"
    assert download.secrets == []  # only with MAGICMIX_HF_SECRET: a gated model's token
    assert modal_app.sweep.info().schedule == "Cron('*/2 * * * *', UTC)"
    assert "modal.Secret.from_name('magicmix')" in modal_app.manage_keys.info().secrets


def test_deploy_time_knobs_are_read_at_import_and_baked_in() -> None:
    assert deployed("knobs")["module"] == [
        16,
        4,
        45,
        True,
        "",
        "16",
        ["modal.Secret.from_name('huggingface')"],
    ]
