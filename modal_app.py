"""magicmix on Modal: `modal deploy modal_app.py` (step by step: docs/deploy.md).

Declarations only; the behaviour lives in `magicmix.backends.modal`. Deploy-time knobs are
environment variables read here, on the deploying machine, and baked into the image so
containers re-importing this file see the same values:

    MAGICMIX_GPU             GPU type of the GPU class (default L40S; see docs/deploy.md)
    MAGICMIX_MODEL           hub id of an SD 1.x checkpoint (default SD 1.5)
    MAGICMIX_MODEL_REVISION  pin that checkpoint to a commit
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import modal

if TYPE_CHECKING:
    from fastapi import FastAPI

    from magicmix.backends.modal.compose import ModalParts

APP_NAME = "magicmix"
GPU = os.environ.get("MAGICMIX_GPU", "L40S")
MODEL = os.environ.get("MAGICMIX_MODEL", "stable-diffusion-v1-5/stable-diffusion-v1-5")
MODEL_REVISION = os.environ.get("MAGICMIX_MODEL_REVISION", "")
# CUDA 12.8 wheels (driver 570+): PyPI's default CUDA build moves with each torch release.
TORCH = ("torch==2.8.0", "https://download.pytorch.org/whl/cu128")
CACHE_DIR = "/cache"  # the weights Volume; the Hugging Face cache lives under it
BATCH_SIZE = 4  # jobs per UNet batch
BATCH_WAIT_MS = 150  # how long a GPU container waits for a batch to fill
MAX_GPU_CONTAINERS = 4  # the cost ceiling: at most this many GPUs at once
GPU_IDLE_S = 120  # an idle GPU container scales down after this
ROOT = Path(__file__).resolve().parent

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(TORCH[0], index_url=TORCH[1])  # then pyproject's `torch>=2.3` is met
    .pip_install_from_pyproject(str(ROOT / "pyproject.toml"))
    .env(
        {
            "HF_HOME": f"{CACHE_DIR}/hf",
            "MAGICMIX_GPU": GPU,
            "MAGICMIX_MODEL": MODEL,
            "MAGICMIX_BATCH_SIZE": str(BATCH_SIZE),
            **({"MAGICMIX_MODEL_REVISION": MODEL_REVISION} if MODEL_REVISION else {}),
        }
    )
    # Last: no build step may follow local files. `ignore` keeps static/ (not only .py).
    .add_local_python_source("magicmix", ignore=["**/__pycache__/**"])
)
app = modal.App(APP_NAME, image=image)

weights = modal.Volume.from_name("magicmix-weights", create_if_missing=True)
dicts = {
    name: modal.Dict.from_name(f"magicmix-{name}", create_if_missing=True)
    for name in ("jobs", "active", "outbox", "expiring", "keys")
}
service_secrets = [
    modal.Secret.from_name("magicmix", required_keys=["MAGICMIX_API_KEYS", "MAGICMIX_SECRET_KEY"]),
    modal.Secret.from_name("magicmix-s3", required_keys=["MAGICMIX_STORE_URL"]),
]

with image.imports():
    from magicmix.backends.modal import compose
    from magicmix.backends.modal.calls import ModalGpuCalls
    from magicmix.backends.modal.gpu import GpuWorker
    from magicmix.backends.modal.weights import download_weights as fill_volume
    from magicmix.config import Settings
    from magicmix.engine.configure import engine_on_cuda, load_for_snapshot
    from magicmix.http.app import create_app


def parts() -> ModalParts:
    """What every container shares; the web URL is the default public URL."""
    settings = compose.modal_settings(web.get_web_url())
    return compose.modal_parts(settings, dicts, send_webhooks.spawn)


@app.function(volumes={CACHE_DIR: weights}, timeout=3600)
def download_weights() -> None:
    """`modal run modal_app.py::download_weights`: fill the Volume from the hub, once."""
    fill_volume(Settings())
    weights.commit()


@app.cls(
    gpu=GPU,
    secrets=service_secrets,
    volumes={CACHE_DIR: weights},
    env={"HF_HUB_OFFLINE": "1"},  # weights come from the Volume, never the hub
    enable_memory_snapshot=True,
    scaledown_window=GPU_IDLE_S,
    max_containers=MAX_GPU_CONTAINERS,
    timeout=600,
    startup_timeout=900,
)
class MagicMix:
    """Loads the model once per container; runs batches of compatible jobs."""

    @modal.enter(snap=True)
    def load(self) -> None:
        self.weights = load_for_snapshot(Settings())

    @modal.enter(snap=False)
    def to_gpu(self) -> None:
        shared = parts()
        self.worker = GpuWorker(shared, engine_on_cuda(self.weights, shared.settings))

    @modal.batched(max_batch_size=BATCH_SIZE, wait_ms=BATCH_WAIT_MS)
    def run(self, job_inputs: list[str]) -> list[str]:
        return self.worker.run(job_inputs)


@app.function(secrets=service_secrets, timeout=900)
async def send_webhooks(job_ids: list[int]) -> None:
    """Webhooks leave from a CPU container, so the GPU never waits on a receiver."""
    await compose.deliver_webhooks(parts(), job_ids)


@app.function(secrets=service_secrets, timeout=180)
@modal.concurrent(max_inputs=64)
@modal.asgi_app()
def web() -> FastAPI:
    """The same FastAPI app as `magicmix serve`."""
    shared = parts()
    return create_app(compose.web_service(shared, ModalGpuCalls(MagicMix().run), gpu_name=GPU))


@app.function(secrets=service_secrets, schedule=modal.Cron("*/5 * * * *"), timeout=900)
async def sweep() -> None:
    """Every 5 minutes: crash repair, the 24-hour rule, stuck jobs, webhook retries."""
    shared = parts()
    dispatch = compose.dispatcher(shared, ModalGpuCalls(MagicMix().run), gpu_name=GPU)
    await compose.run_sweep(shared, dispatch)
