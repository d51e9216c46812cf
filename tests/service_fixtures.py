"""Run the real service: uvicorn on a loopback port, real SQLite, the tiny model.

Also `parses`, which counts the bodies the app parses (a body refused unparsed adds none).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image
from starlette.requests import Request

from magicmix.backends.local.compose import build_local_service, open_key_store
from magicmix.config import Settings
from magicmix.http.app import create_app
from magicmix.http.schemas import SEED_EXAMPLE
from magicmix.http.server import uvicorn_config
from magicmix.service import MagicMixService
from magicmix.sweep import Sweeper, SweepReport
from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, free_port, respond

API = "/api/v1/enterprise"
MIX = f"{API}/image_editing/magic_mix"


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class RunningService:
    """A served app plus the keys and helpers a test needs."""

    base_url: str
    settings: Settings
    service: MagicMixService
    key: str
    admin_key: str
    http: httpx.Client

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(self.base_url + path, json=body)

    def mix(self, **fields: Any) -> httpx.Response:
        body = {**SEED_EXAMPLE, "key": self.key, "width": 256, "height": 256, **fields}
        return self.post(MIX, body)

    def fetch(self, job_id: int, key: str | None = None) -> httpx.Response:
        return self.post(f"{API}/image_editing/fetch/{job_id}", {"key": key or self.key})

    def wait_success(self, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
        """Poll fetch like ModelsLab's SDK does, until the job is no longer processing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.fetch(job_id).json()
            if reply["status"] != "processing":
                return reply
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} still processing after {timeout}s")

    def download(self, url: str) -> bytes:
        response = self.http.get(url)
        assert response.status_code == 200, response.text
        return response.content


def service_settings(tmp_path: Path, model_dir: Path, **overrides: Any) -> Settings:
    port = overrides.pop("port", None) or free_port()
    values: dict[str, Any] = {
        "model": str(model_dir),
        "data_dir": tmp_path / "data",
        "device": "cpu",
        "public_url": f"http://127.0.0.1:{port}",
        "allow_private_urls": True,
        "sync_wait_s": 30.0,
        "webhook_schedule": (0.0, 0.05, 0.1),
        "batch_wait_ms": 20,
        "secret_key": "test-secret-key-0123456789",
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def serve(settings: Settings) -> Iterator[RunningService]:
    """uvicorn in a thread on the port of `settings.public_url`; stops on exit."""
    port = int(settings.public_url.rsplit(":", 1)[1])
    service = build_local_service(settings)
    keys = open_key_store(settings)
    key, admin_key = keys.create().key, keys.create(admin=True).key
    config = uvicorn_config(
        create_app(service),
        host="127.0.0.1",
        port=port,
        settings=settings,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    assert service.dispatcher.wait_ready(60), "engine did not load"  # type: ignore[attr-defined]
    with httpx.Client(timeout=60) as http:
        try:
            yield RunningService(settings.public_url, settings, service, key, admin_key, http)
        finally:
            server.should_exit = True
            thread.join(30)


def sweep_now(service: MagicMixService) -> SweepReport:
    """One sweep over a running service's stores, as its periodic sweep would run it."""
    sweeper = Sweeper(service.lifecycle, service.outputs.service, service.settings)
    return asyncio.run(sweeper.run_once())


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the request bodies FastAPI parses as JSON (by their size)."""
    seen: list[int] = []
    real = Request.json

    async def counting(self: Request) -> Any:
        seen.append(len(await self.body()))
        return await real(self)

    monkeypatch.setattr(Request, "json", counting)
    return seen


@pytest.fixture(scope="module")
def image_host() -> Iterator[LoopbackServer]:
    """Serves layout images on loopback: /layout.png, /layout.jpg, /notimage.txt."""
    with LoopbackServer() as server:
        server.route(
            "/layout.png", respond(200, png(make_layout_image()), {"Content-Type": "image/png"})
        )
        server.route(
            "/layout.jpg",
            respond(200, png(make_layout_image(), "JPEG"), {"Content-Type": "image/jpeg"}),
        )
        server.route("/notimage.txt", respond(200, b"hello", {"Content-Type": "text/plain"}))
        yield server


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, image_host: LoopbackServer
) -> Iterator[RunningService]:
    """One served app shared by a test module (jobs are independent by id)."""
    settings = service_settings(tmp_path_factory.mktemp("svc"), tiny_model_dir, sync_wait_s=120)
    with serve(settings) as running:
        yield running
