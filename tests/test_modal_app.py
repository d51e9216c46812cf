"""`modal_app.py` imports offline and declares what the deployment needs.

Read from Modal's local function definitions only; nothing here calls Modal's servers.
Autoscaling and snapshot settings are not in Modal's public `FunctionInfo`, so they are
read from the loader's closure (`_declared`): private to modal 1.6, re-check on upgrades.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import modal
from modal._utils.async_utils import synchronizer

import modal_app

ROOT = Path(__file__).resolve().parent.parent


def _declared(function: modal.Function) -> dict[str, Any]:
    """The options `@app.cls` / `@app.function` captured for deploy time."""
    load = synchronizer._translate_in(function)._load
    return dict(
        zip(load.__code__.co_freevars, (c.cell_contents for c in load.__closure__), strict=True)
    )


def test_import_needs_no_credentials_network_or_project_deps(tmp_path: Path) -> None:
    """As on a laptop with only `modal` installed: magicmix is hidden, no Modal token."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MAGICMIX_GPU": "h100"}
    code = (
        "import sys; sys.modules['magicmix'] = None; import modal_app;"
        " print(modal_app.GPU, modal_app.MagicMix._get_class_service_function().info().gpus)"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["h100", "[('H100',", "1)]"]


def test_gpu_class_loads_once_from_the_volume_and_scales_to_zero() -> None:
    gpu = modal_app.MagicMix._get_class_service_function()
    info = gpu.info()
    assert info.gpus == [(modal_app.GPU.upper(), 1)]
    assert info.volumes[modal_app.CACHE_DIR].name == "magicmix-weights"
    assert "Secret.from_dict([HF_HUB_OFFLINE])" in info.secrets
    assert info.batching_info is not None
    assert info.batching_info.max_batch_size == modal_app.BATCH_SIZE
    assert list(modal_app.MagicMix._get_method_names()) == ["run"]
    declared = _declared(gpu)
    assert declared["enable_memory_snapshot"] is True
    autoscaling = declared["autoscaler_settings"]
    assert autoscaling.scaledown_window == modal_app.GPU_IDLE_S
    assert autoscaling.max_containers == modal_app.MAX_GPU_CONTAINERS
    assert not autoscaling.min_containers


def test_web_function_serves_the_asgi_app_on_a_cpu() -> None:
    info = modal_app.web.info()
    assert info.web_info is not None and info.gpus == []
    assert synchronizer._translate_in(modal_app.web)._webhook_config.type == 1  # ASGI app
    assert "modal.Secret.from_name('magicmix')" in info.secrets


def test_download_and_scheduled_cleanup_are_declared() -> None:
    download = modal_app.download_weights.info()
    assert download.volumes[modal_app.CACHE_DIR].name == "magicmix-weights"
    assert download.secrets == []  # the hub download needs none of the service's secrets
    assert modal_app.sweep.info().schedule == "Cron('*/5 * * * *', UTC)"
    assert modal_app.send_webhooks.info().gpus == []
