"""`modal_app` imported afresh under given environments, in one child process per session.

Deploy-time knobs are read when `modal_app` is imported, so only a fresh import shows
them. Importing it pulls in torch (through the GPU image's imports, which run wherever
torch is installed), about 8 s; one child reloads the module once per environment instead
of paying that per test. The child starts with only PATH and HOME: nothing of ours leaks in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS: dict[str, dict[str, str]] = {
    "knobs": {
        "MAGICMIX_MAX_GPUS": "16",
        "MAGICMIX_BATCH_SIZE": "4",
        "MAGICMIX_GPU_IDLE_S": "45",
        "MAGICMIX_GPU_SNAPSHOT": "1",
        "MAGICMIX_HF_SECRET": "huggingface",
        "MAGICMIX_MODEL": "org/model",
    },
    "capacity": {"MAGICMIX_GPU": "H200", "MAGICMIX_MAX_GPUS": "8", "MAGICMIX_BATCH_WAIT_MS": "50"},
    "sdxl": {
        "MAGICMIX_GPU": "H200",
        "MAGICMIX_MAX_GPUS": "8",
        "MAGICMIX_MODEL": "stabilityai/stable-diffusion-xl-base-1.0",
    },
}
PROBE = """
import importlib, json, os, sys
environments, data = json.loads(sys.argv[1]), sys.argv[2]
import modal_app
from magicmix.config import Settings
report = {}
for name, env in environments.items():
    for key in [k for k in os.environ if k.startswith("MAGICMIX_")]:
        del os.environ[key]
    os.environ.update(env)
    m = importlib.reload(modal_app)
    os.environ.update(m.DEPLOY_ENV, MAGICMIX_DATA_DIR=data)  # what a container starts with
    s = Settings()
    report[name] = {
        "module": [m.MAX_GPUS, m.BATCH_SIZE, m.GPU_IDLE_S, m.GPU_SNAPSHOT, m.MODEL_REVISION,
                   m.DEPLOY_ENV["MAGICMIX_MAX_GPUS"], m.download_weights.info().secrets],
        "settings": [s.gpu, s.max_gpus, s.batch_size, s.batch_wait_ms, s.max_queue],
        "family": [m.FAMILY.name, m.BATCH_SIZE, s.model_family, s.batch_size],
    }
print(json.dumps(report))
"""


@lru_cache(maxsize=1)
def _report() -> dict[str, dict[str, list[Any]]]:
    with tempfile.TemporaryDirectory(prefix="deploy-probe-") as home:
        env = {"PATH": os.environ["PATH"], "HOME": home}
        done = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(ENVIRONMENTS), home],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def deployed(name: str) -> dict[str, list[Any]]:
    """What `modal_app` and a container's Settings make of environment `name`."""
    return _report()[name]
