"""What attacks cost a running server: `python -m benchmarks.attacks [--repo DIR] [--only A,B]`.

1. The parse attack: a 12 MB body of `[],[],...` with a bogus key, sent 3 times while a
   prober asks `/healthz` every 20 ms: the probe latencies (max, p50) and the replies.
2. The decode attack: six concurrent submissions of a 170 KB 6320x6320 RGBA PNG while
   the prober runs: the server's peak RSS (VmHWM) and probe latencies; then the same
   with six 4000x3000 RGB PNGs, which every limit accepts.
3. The compressed bomb (`bomb`): 32 concurrent submissions of an image URL served from
   loopback as 204 KB of gzip (200 MB of zeros) with `Content-Encoding: gzip`: the
   server's peak RSS and the worst `/healthz` latency meanwhile.
4. The metadata payload (`icc`): a 64x64 JPEG carrying a 5 MB ICC profile: the size of
   the layout PNG the job keeps (`decode_image` then `png_bytes` of `--repo`, in a
   subprocess), and what the server answers to it.
5. Webhook receivers that stall every tenant (`stall`): 64 jobs of one key whose receiver
   holds each attempt open for a minute, or answers 503 with `Retry-After: ²` (a digit
   `str.isdigit` accepts and `float` refuses); then one job of another key with a healthy
   receiver: how long after its submission its webhook arrives, next to the same job
   with no other webhooks about (the tiny model, so the jobs themselves take little).

The server is `magicmix serve` in a subprocess on loopback, run from `--repo` (default:
this checkout), so the same script measures an older commit checked out elsewhere.
Prints one JSON object; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import io
import json
import os
import random
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def settle(pid: int, quiet_s: float = 1.0, timeout_s: float = 300.0) -> None:
    """Wait until the server has used under 5% of a core for `quiet_s` (the engine loads
    in the background after `/healthz` answers; its CPU would blur the figures)."""

    def cpu_s() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_s()
        time.sleep(quiet_s)
        if cpu_s() - before < 0.05 * quiet_s:
            return


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
def running_server(repo: Path, **env_extra: str) -> Iterator[tuple[str, int]]:
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
            **env_extra,
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


@contextmanager
def serving(files: dict[str, tuple[bytes, dict[str, str]]]) -> Iterator[str]:
    """A loopback HTTP server answering each path of `files` with (body, headers)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, headers = files.get(self.path, (b"", {}))
            self.send_response(200 if self.path in files else 404)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            # the server under test gives up on the body: expected
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def gzip_of_zeros(megabytes: int) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as packer:
        block = bytes(2**20)
        for _ in range(megabytes):
            packer.write(block)
    return buffer.getvalue()


def bomb_attack(repo: Path, clients: int = 32) -> dict[str, Any]:
    bomb_gz = gzip_of_zeros(200)
    files = {"/bomb.png": (bomb_gz, {"Content-Type": "image/png", "Content-Encoding": "gzip"})}
    with (
        serving(files) as host,
        running_server(repo, MAGICMIX_ALLOW_PRIVATE_URLS="true") as (base, pid),
    ):
        body = {"key": KEY, "prompt": "x", "image": host + "/bomb.png"}
        settle(pid)
        idle = peak_rss_mb(pid)
        prober = Prober(base)
        prober.start()
        with httpx.Client(timeout=300) as client, ThreadPoolExecutor(clients) as pool:
            replies = list(pool.map(lambda _: client.post(base + MIX, json=body), range(clients)))
        prober.stop.set()
        prober.join()
        return {
            "clients": clients,
            "bomb_bytes": len(bomb_gz),
            "replies": sorted({r.status_code for r in replies}),
            "healthz": prober.summary(),
            "rss_idle_mb": round(idle, 1),
            "peak_rss_mb": round(peak_rss_mb(pid), 1),
        }


def icc_jpeg(profile_bytes: int, size: int = 64) -> bytes:
    """A `size`-pixel square JPEG carrying an ICC profile of `profile_bytes`: a real sRGB
    profile padded with random bytes (incompressible, as a real large profile's tables)."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    profile = srgb + random.Random(0).randbytes(profile_bytes - len(srgb))
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, "JPEG", icc_profile=profile)
    return buffer.getvalue()


_LAYOUT_SIZE = """
import sys
from magicmix.inputs.images import decode_image, png_bytes
image = decode_image(sys.stdin.buffer.read(), max_pixels=10**8, reduce_to=(256, 256))
print(len(png_bytes(image)))
"""


def icc_attack(repo: Path) -> dict[str, Any]:
    jpeg = icc_jpeg(5 * 2**20)
    layout = subprocess.run(
        [sys.executable, "-c", _LAYOUT_SIZE],
        input=jpeg,
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=repo,
    )
    data_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    with running_server(repo) as (base, _):
        body = {"key": KEY, "prompt": "x", "image": data_uri, "width": 256, "height": 256}
        reply = httpx.post(base + MIX, json=body, timeout=120)
        answer = {"http": reply.status_code, "status": reply.json().get("status")}
        if reply.status_code == 200:  # accepted: how did the job end?
            job_id = reply.json()["id"]
            for _ in range(600):
                ended = httpx.post(
                    f"{base}/api/v1/enterprise/image_editing/fetch/{job_id}",
                    json={"key": KEY},
                    timeout=30,
                ).json()
                if ended["status"] != "processing":
                    break
                time.sleep(0.2)
            answer["job"] = ended["status"]
            answer["message"] = ended.get("message")
        else:
            answer["message"] = reply.json().get("message")
    return {
        "input": "64x64 JPEG with a 5 MB ICC profile",
        "input_bytes": len(jpeg),
        "layout_png_bytes": int(layout.stdout),
        "submission": answer,
    }


def stall_attack(repo: Path, jobs: int = 64) -> dict[str, Any]:
    """Seconds from a healthy key's submission to its webhook's arrival, alone and behind
    `jobs` webhooks of another key whose receiver stalls or poisons every attempt."""
    arrived: dict[str, float] = {}
    hold = threading.Event()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/stall":
                hold.wait(60)  # holds the attempt open past the sender's timeout
            if self.path == "/poison":
                self.send_response(503)
                self.send_header("Retry-After", "\u00b2")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            arrived.setdefault(self.path, time.perf_counter())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    # the stdlib's listen backlog of 5, as the figures recorded were measured (setting
    # request_queue_size here, after the constructor listened, would change nothing)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hooks = f"http://127.0.0.1:{httpd.server_address[1]}"
    other = "attack-bench-other-key"
    layout = "data:image/png;base64," + base64.b64encode(flat_png_bytes()).decode()
    body = {"prompt": "x", "image": layout, "width": 256, "height": 256, "steps": 2}
    result: dict[str, Any] = {"jobs": jobs}
    try:
        for case in ("alone", "stall", "poison"):
            env = {"MAGICMIX_API_KEYS": f"{KEY},{other}", "MAGICMIX_MODEL": "tiny"}
            with (
                running_server(repo, MAGICMIX_ALLOW_PRIVATE_URLS="true", **env) as (base, pid),
                httpx.Client(timeout=60) as client,
            ):
                settle(pid)
                if case != "alone":
                    for seed in range(jobs):
                        hook = f"{hooks}/{case}"
                        job = {**body, "key": KEY, "seed": seed, "webhook": hook}
                        client.post(base + MIX, json=job).raise_for_status()
                    time.sleep(5)  # their attempts are under way
                path = f"/ok-{case}"
                started = time.perf_counter()
                job = {**body, "key": other, "seed": 999, "webhook": hooks + path}
                client.post(base + MIX, json=job).raise_for_status()
                deadline = started + 60
                while path not in arrived and time.perf_counter() < deadline:
                    time.sleep(0.05)
                result[case] = round(arrived[path] - started, 2) if path in arrived else None
    finally:
        hold.set()
        httpd.shutdown()
        httpd.server_close()
    return result


def flat_png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 160, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument(
        "--only", default="parse,decode,large,bomb,icc,stall", help="comma-separated attacks"
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    result: dict[str, Any] = {"label": args.label}
    if "parse" in only:
        with running_server(args.repo) as (base, pid):
            result["parse_attack"] = parse_attack(base, pid)
    if "decode" in only:
        with running_server(args.repo) as (base, pid):
            result["decode_attack"] = decode_attack(base, pid)
    if "large" in only:
        with running_server(args.repo) as (base, pid):  # within every budget: accepted
            result["large_images"] = decode_attack(base, pid, flat_png("RGB", (4000, 3000)))
    if "bomb" in only:
        result["compressed_bomb"] = bomb_attack(args.repo)
    if "icc" in only:
        result["icc_profile"] = icc_attack(args.repo)
    if "stall" in only:
        result["webhook_stall_s"] = stall_attack(args.repo)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
