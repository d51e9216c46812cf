"""What can be proven about a Modal deployment offline, before `modal deploy`.

- the front door (web, webhooks, sweep) imports and serves with torch, diffusers,
  transformers, accelerate and numpy made unimportable;
- the image locks pin exactly the versions this suite runs against;
- `scripts/deploy-check` passes on this checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FRONT_DOOR = """
import json, sys, tempfile, time
for name in ("torch", "diffusers", "transformers", "accelerate", "numpy"):
    sys.modules[name] = None  # any import of them now fails
started = time.perf_counter()
from magicmix.backends.modal import calls, compose, weights
from magicmix.http.app import create_app
from magicmix import webhooks
imported = time.perf_counter() - started
from fastapi.testclient import TestClient
from magicmix.config import Settings
with tempfile.TemporaryDirectory() as tmp:
    settings = Settings(secret_key="s" * 32, store_url="s3://bucket/outputs/", data_dir=tmp,
                        database_url=sys.argv[1])
    parts = compose.modal_parts(settings, lambda: None, pool=compose.POOLS["web"])
    service = compose.web_service(parts, calls.ModalGpuCalls(None), gpu_name="L40S")
    with TestClient(create_app(service)) as http:
        assert http.get("/healthz").status_code == 200
        details = http.post("/api/v1/enterprise/image_editing/system_details", json={"key": "x"})
        assert details.status_code == 401
loaded = [name for name in ("torch", "diffusers", "transformers") if sys.modules.get(name)]
print(json.dumps({"import_s": imported, "loaded": loaded}))
"""


def test_the_front_door_imports_and_serves_without_torch(pg_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRONT_DOOR, pg_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []


def test_the_image_locks_pin_what_this_suite_runs_against() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_deploy_check_passes() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy-check")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all good" in done.stdout and "web: cpu, web image, web endpoint" in done.stdout
    assert "2. image locks match the environment" in done.stdout
