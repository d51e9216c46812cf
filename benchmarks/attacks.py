"""What two attacks cost a running server: `python -m benchmarks.attacks [--repo DIR]`.

1. The parse attack: a 12 MB body of `[],[],...` with a bogus key, sent 3 times while a
   prober asks `/healthz` every 20 ms: the probe latencies (max, p50) and the replies.
2. The decode attack: six concurrent submissions of a 170 KB 6320x6320 RGBA PNG while
   the prober runs: the server's peak RSS (VmHWM) and probe latencies; then the same
   with six 4000x3000 RGB PNGs, which every limit accepts.

The server is `magicmix serve` in a subprocess on loopback, run from `--repo` (default:
this checkout), so the same script measures an older commit checked out elsewhere.
Prints one JSON object; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

KEY = "attack-bench-key"
MIX = "/api/v1/enterprise/image_editing/magic_mix"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prober(threading.Thread):
    """GET /healthz every 20 ms; records each latency in seconds."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.latencies, self.stop = base, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                client.get(self.base + "/healthz")
                self.latencies.append(time.perf_counter() - started)
                self.stop.wait(0.02)

    def summary(self) -> dict[str, float]:
        values = self.latencies or [0.0]
        return {"max_s": round(max(values), 3), "p50_s": round(statistics.median(values), 4)}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flat_png(mode: str, size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 255)[: len(mode)]).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bomb() -> str:
    """6320x6320 RGBA: 170 KB sent, 160 MB decoded (within the old 40 MP limit)."""
    return flat_png("RGBA", (6320, 6320))


@contextmanager
def running_server(repo: Path) -> Iterator[tuple[str, int]]:
    """`magicmix serve` from `repo` on a free loopback port: (base URL, pid)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {
            **os.environ,
            "PYTHONPATH": str(repo),
            "MAGICMIX_DATA_DIR": data,
            "MAGICMIX_DEVICE": "cpu",
            "MAGICMIX_API_KEYS": KEY,
            "MAGICMIX_SECRET_KEY": "attack-bench-secret",
            "MAGICMIX_PUBLIC_URL": base,
            "MAGICMIX_LOG_LEVEL": "WARNING",
            "MAGICMIX_SYNC_WAIT_S": "0",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "magicmix", "serve", "--port", str(port)],
            cwd=repo,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            yield base, server.pid
        finally:
            server.kill()
            server.wait(10)


def parse_attack(base: str, pid: int) -> dict[str, Any]:
    attack = b'{"key": "bogus", "prompt": "x", "image": [' + b"[]," * 4_000_000 + b"[]]}"
    idle = peak_rss_mb(pid)
    prober = Prober(base)
    prober.start()
    with httpx.Client(timeout=120) as client:
        statuses = [
            client.post(
                base + MIX, content=attack, headers={"content-type": "application/json"}
            ).status_code
            for _ in range(3)
        ]
    prober.stop.set()
    prober.join()
    return {
        "replies": statuses,
        "healthz": prober.summary(),
        "rss_idle_mb": round(idle, 1),
        "peak_rss_mb": round(peak_rss_mb(pid), 1),
    }


def decode_attack(base: str, pid: int, image: str | None = None) -> dict[str, Any]:
    body = {"key": KEY, "prompt": "x", "image": image or bomb(), "width": 256, "height": 256}
    idle = peak_rss_mb(pid)
    prober = Prober(base)
    prober.start()
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: client.post(base + MIX, json=body), range(6)))
    prober.stop.set()
    prober.join()
    return {
        "replies": [r.status_code for r in replies],
        "healthz": prober.summary(),
        "rss_idle_mb": round(idle, 1),
        "peak_rss_mb": round(peak_rss_mb(pid), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    result: dict[str, Any] = {"label": args.label}
    with running_server(args.repo) as (base, pid):
        result["parse_attack"] = parse_attack(base, pid)
    with running_server(args.repo) as (base, pid):
        result["decode_attack"] = decode_attack(base, pid)
    with running_server(args.repo) as (base, pid):  # within every budget: accepted
        result["large_images"] = decode_attack(base, pid, flat_png("RGB", (4000, 3000)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
