"""Nothing lost: jobs accepted before the server process dies finish after a restart."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, free_port, respond
from tests.service_fixtures import MIX, png

KEY = "restart-test-key"


@contextmanager
def server_process(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`magicmix serve` as a real process; killed (SIGKILL) on exit if still alive."""
    process = subprocess.Popen(
        [sys.executable, "-m", "magicmix", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:  # no deadline of our own: pytest's timeout guards a hung start
            assert process.poll() is None, "server exited during start-up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def server_env(tmp_path: Path, model_dir: Path, base: str, **extra: str) -> dict[str, str]:
    """A server's environment: its own data dir, the tiny model, async replies."""
    return {
        **os.environ,
        "MAGICMIX_DATA_DIR": str(tmp_path / "data"),
        "MAGICMIX_MODEL": str(model_dir),
        "MAGICMIX_DEVICE": "cpu",
        "MAGICMIX_SYNC_WAIT_S": "0",
        "MAGICMIX_PUBLIC_URL": base,
        "MAGICMIX_API_KEYS": KEY,
        "MAGICMIX_SECRET_KEY": "restart-secret",
        "MAGICMIX_LOG_LEVEL": "WARNING",
        # a killed worker's claims lapse after 2 s and the next sweep requeues them
        "MAGICMIX_LEASE_S": "2",
        "MAGICMIX_SWEEP_INTERVAL_S": "0.5",
        **extra,
    }


def test_jobs_queued_before_a_kill_complete_after_restart(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Private URLs: the layout image is served by a loopback host of this test.
    env = server_env(
        tmp_path, tiny_model_dir, base, MAGICMIX_ALLOW_PRIVATE_URLS="true", MAGICMIX_BATCH_SIZE="1"
    )
    with LoopbackServer() as host:
        host.route(
            "/layout.png", respond(200, png(make_layout_image()), {"Content-Type": "image/png"})
        )
        body = {
            "key": KEY,
            "prompt": "Bed",
            "image": host.url("/layout.png"),
            "width": 256,
            "height": 256,
            "steps": 20,
            "kmin": 0.5,
            "kmax": 1.0,
        }
        with server_process(env, port) as first:
            ids = []
            for seed in range(4):
                reply = httpx.post(base + MIX, json={**body, "seed": seed}, timeout=30).json()
                assert reply["status"] == "processing", reply
                ids.append(reply["id"])
            os.kill(first.pid, signal.SIGKILL)  # no graceful shutdown: a crash
            first.wait(10)
        with server_process(env, port):
            finals = {}
            while len(finals) < len(ids):  # no deadline of our own: pytest's timeout guards
                for job_id in set(ids) - set(finals):
                    reply = httpx.post(
                        f"{base}/api/v1/enterprise/image_editing/fetch/{job_id}",
                        json={"key": KEY},
                        timeout=30,
                    ).json()
                    if reply["status"] != "processing":
                        finals[job_id] = reply
                time.sleep(0.3)
            assert all(r["status"] == "success" for r in finals.values()), finals
            for reply in finals.values():
                assert httpx.get(reply["output"][0], timeout=30).status_code == 200
    outputs = sorted(p.name for p in (tmp_path / "data" / "outputs").iterdir())
    assert len(outputs) == len(ids)  # exactly one result per job, even for re-run ones
    assert {name.split("-")[0] for name in outputs} == {str(i) for i in ids}


def test_a_resend_after_a_kill_gets_the_first_jobs_reply(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Idempotency-Key across a crash: the key was bound to its job in the job's insert."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(tmp_path, tiny_model_dir, base)
    layout = base64.b64encode(png(make_layout_image())).decode()
    body = {"key": KEY, "prompt": "Bed", "image": layout, "width": 256, "height": 256, "seed": 3}
    headers = {"Idempotency-Key": "pay-once-17"}
    with server_process(env, port) as first:
        reply = httpx.post(base + MIX, json=body, headers=headers, timeout=30).json()
        assert reply["status"] in ("processing", "success"), reply
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    with server_process(env, port):
        again = httpx.post(base + MIX, json=body, headers=headers, timeout=30)
        assert again.status_code == 200 and again.json()["id"] == reply["id"]
        other = httpx.post(base + MIX, json={**body, "seed": 4}, headers=headers, timeout=30)
        assert other.status_code == 422
