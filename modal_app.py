"""magicmix on Modal: `modal deploy modal_app.py` (step by step: docs/deploy.md).

Declarations only; the behaviour lives in `magicmix.backends.modal`. This file imports
with `modal` alone (no credentials, no project dependencies) so it deploys from a laptop.

Deploy-time knobs: environment variables read here, on the deploying machine, and baked
into the images, so every container sees the same values. Changing one needs a redeploy
(`modal deploy modal_app.py`); the `MAGICMIX_*` values in the Modal secrets are the
run-time settings, read when a container starts.

    MAGICMIX_GPU             GPU type of the GPU class (default L40S; see docs/deploy.md)
    MAGICMIX_MODEL           hub id of an SD 1.x or SDXL checkpoint (default SD 1.5)
    MAGICMIX_MODEL_REVISION  the checkpoint's commit (default: the pinned one of the default)
    MAGICMIX_DTYPE           float16 (default), bfloat16 or float32 on the GPU
    MAGICMIX_MODEL_FAMILY    sd1 or sdxl (default: as the model id suggests, magicmix/families.py)
    MAGICMIX_MAX_GPUS        the cost ceiling: at most this many GPU containers (default 4)
    MAGICMIX_BATCH_SIZE      jobs per UNet batch (default: the family's, 8 for SD 1.x, 4 SDXL)
    MAGICMIX_BATCH_WAIT_MS   how long a GPU container waits for a batch to fill (default 100)
    MAGICMIX_GPU_IDLE_S      an idle GPU container scales down after this (default 30)
    MAGICMIX_GPU_SNAPSHOT    1: snapshot the GPU state too (Modal alpha; default off)
    MAGICMIX_COMPILE         1: torch.compile at container start, cached in a Volume (off)
    MAGICMIX_HF_SECRET       name of a Modal secret with HF_TOKEN, for gated checkpoints
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import modal

from magicmix.families import family_named, guess_family  # standard library only

if TYPE_CHECKING:
    from fastapi import FastAPI

    from magicmix.backends.modal.compose import ModalParts
    from magicmix.store.database import PoolSize

APP_NAME = "magicmix"
ROOT = Path(__file__).resolve().parent
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"  # pinned: a redeploy never drifts
GPU = os.environ.get("MAGICMIX_GPU", "L40S")
MODEL = os.environ.get("MAGICMIX_MODEL", SD15)
MODEL_REVISION = os.environ.get("MAGICMIX_MODEL_REVISION", SD15_REVISION if MODEL == SD15 else "")
DTYPE = os.environ.get("MAGICMIX_DTYPE", "float16")
# the web tier sizes requests by family without the weights; the GPU class checks it
FAMILY = family_named(os.environ.get("MAGICMIX_MODEL_FAMILY") or guess_family(MODEL).name)
MAX_GPUS = int(os.environ.get("MAGICMIX_MAX_GPUS", "4"))
BATCH_SIZE = int(os.environ.get("MAGICMIX_BATCH_SIZE", FAMILY.batch_size))
BATCH_WAIT_MS = int(os.environ.get("MAGICMIX_BATCH_WAIT_MS", "100"))
GPU_IDLE_S = int(os.environ.get("MAGICMIX_GPU_IDLE_S", "30"))
GPU_SNAPSHOT = os.environ.get("MAGICMIX_GPU_SNAPSHOT", "") == "1"
COMPILE = os.environ.get("MAGICMIX_COMPILE", "") == "1"
RUN_ATTEMPTS = 3  # a batch's inputs run at most this often (Modal retries a crashed container)
HF_SECRET = os.environ.get("MAGICMIX_HF_SECRET", "")
CACHE_DIR = "/cache"  # the weights Volume; the Hugging Face cache lives under it
COMPILE_DIR = "/compile-cache"  # the compile-cache Volume: torch.compile's output, by key
LOCKS = ROOT / "requirements"  # pinned to what CI tests (scripts/lock.py)

DEPLOY_ENV = {
    "HF_HOME": f"{CACHE_DIR}/hf",
    "MAGICMIX_GPU": GPU,
    "MAGICMIX_MODEL": MODEL,
    "MAGICMIX_DTYPE": DTYPE,
    "MAGICMIX_MODEL_FAMILY": FAMILY.name,
    "MAGICMIX_MAX_GPUS": str(MAX_GPUS),
    "MAGICMIX_BATCH_SIZE": str(BATCH_SIZE),
    "MAGICMIX_BATCH_WAIT_MS": str(BATCH_WAIT_MS),
    "MAGICMIX_MAX_RUN_ATTEMPTS": str(RUN_ATTEMPTS),
    "MAGICMIX_COMPILE": "true" if COMPILE else "false",
    "MAGICMIX_COMPILE_CACHE_DIR": COMPILE_DIR,
    "MAGICMIX_COMPILE_WORK_DIR": "/tmp/magicmix-inductor",  # the container's own disk
    **({"MAGICMIX_MODEL_REVISION": MODEL_REVISION} if MODEL_REVISION else {}),
}
# Heavy layers first, local source last: a code change rebuilds only the last layer.
gpu_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_requirements(str(LOCKS / "image-gpu.txt"))  # torch's CUDA build
    .env(DEPLOY_ENV)
    .add_local_python_source("magicmix", ignore=["**/__pycache__/**"])
)
web_image = (  # the front door: no torch, so it starts in seconds
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_requirements(str(LOCKS / "image-web.txt"))
    .env(DEPLOY_ENV)
    .add_local_python_source("magicmix", ignore=["**/__pycache__/**"])
)
app = modal.App(APP_NAME, image=web_image)

weights = modal.Volume.from_name("magicmix-weights", create_if_missing=True)
compile_cache = modal.Volume.from_name("magicmix-compile-cache", create_if_missing=True)
# All state is in the database named by the secret (docs/deploy.md step 2); Modal holds none.
service_secrets = [
    modal.Secret.from_name(
        "magicmix", required_keys=["MAGICMIX_SECRET_KEY", "MAGICMIX_DATABASE_URL"]
    ),
    modal.Secret.from_name("magicmix-s3", required_keys=["MAGICMIX_STORE_URL"]),
]
hub_secrets = [modal.Secret.from_name(HF_SECRET, required_keys=["HF_TOKEN"])] if HF_SECRET else []

with web_image.imports():
    from magicmix.backends.modal import compose
    from magicmix.backends.modal.calls import ModalGpuCalls
    from magicmix.backends.modal.weights import download_weights as fill_volume
    from magicmix.cli.keys import key_action
    from magicmix.config import Settings
    from magicmix.http.app import create_app

with gpu_image.imports():
    from magicmix.backends.modal.gpu import GpuWorker
    from magicmix.engine.configure import engine_on_device, load_for_snapshot


def parts(pool: PoolSize) -> ModalParts:
    """What every container shares (called after any snapshot: it opens the database)."""
    settings = compose.modal_settings(web.get_web_url())
    return compose.modal_parts(settings, send_webhooks.spawn, pool=pool)


def gpu_calls() -> ModalGpuCalls:
    return ModalGpuCalls(MagicMix().run)


@app.function(volumes={CACHE_DIR: weights}, secrets=hub_secrets, timeout=3600)
def download_weights() -> None:
    """`modal run modal_app.py::download_weights`: fill the Volume from the hub, once."""
    fill_volume(Settings())
    weights.commit()


@app.cls(
    image=gpu_image,
    gpu=GPU,
    secrets=service_secrets,
    volumes={CACHE_DIR: weights.with_mount_options(read_only=True), COMPILE_DIR: compile_cache},
    env={"HF_HUB_OFFLINE": "1"},  # weights come from the Volume, never the hub
    enable_memory_snapshot=True,
    experimental_options={"enable_gpu_snapshot": True} if GPU_SNAPSHOT else None,
    scaledown_window=GPU_IDLE_S,
    max_containers=MAX_GPUS,
    retries=modal.Retries(max_retries=RUN_ATTEMPTS - 1, initial_delay=1.0),  # a crashed container
    timeout=600,
    startup_timeout=900,
)
class MagicMix:
    """Loads the model once per container; runs batches of compatible jobs."""

    @modal.enter(snap=True)
    def load(self) -> None:
        self.weights = load_for_snapshot(Settings(), on_gpu=GPU_SNAPSHOT)

    @modal.enter(snap=False)
    def to_gpu(self) -> None:
        shared = parts(compose.POOLS["gpu"])
        self.worker = GpuWorker(shared, engine_on_device(self.weights, shared.settings))
        if COMPILE:
            compile_cache.commit()  # a warm-up that compiled publishes for the next container

    @modal.batched(max_batch_size=BATCH_SIZE, wait_ms=BATCH_WAIT_MS)
    def run(self, job_inputs: list[str]) -> list[str]:
        return self.worker.run(job_inputs)


@app.function(secrets=service_secrets, enable_memory_snapshot=True, timeout=900)
async def send_webhooks() -> None:
    """Webhooks leave from a CPU container, so the GPU never waits on a receiver."""
    await compose.deliver_webhooks(parts(compose.POOLS["webhooks"]))


@app.function(secrets=service_secrets, enable_memory_snapshot=True, timeout=180)
@modal.concurrent(max_inputs=64)
@modal.asgi_app()
def web() -> FastAPI:
    """The same FastAPI app as `magicmix serve`."""
    return create_app(compose.web_service(parts(compose.POOLS["web"]), gpu_calls(), gpu_name=GPU))


@app.function(secrets=service_secrets, schedule=modal.Cron("*/2 * * * *"), timeout=900)
async def sweep() -> None:
    """Every 2 minutes: lapsed claims, lost GPU calls, the 24-hour rule, webhook retries."""
    shared = parts(compose.POOLS["sweep"])
    await compose.run_sweep(shared, compose.dispatcher(shared, gpu_calls(), gpu_name=GPU))


@app.function(secrets=service_secrets, timeout=120)
def manage_keys(action: str, key_id: str = "", admin: bool = False) -> str:
    """The key store of the deployed app; `keys` below (or `magicmix keys --modal`) calls it."""
    shared = parts(compose.POOLS["keys"])
    return compose.manage_keys(shared, key_action, action, key_id=key_id, admin=admin)


@app.local_entrypoint()
def keys(action: str, key_id: str = "", admin: bool = False) -> None:
    """`modal run modal_app.py::keys --action create [--admin] | list | revoke --key-id ID`."""
    print(manage_keys.remote(action, key_id, admin))
