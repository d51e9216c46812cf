"""A small Modal app for `tests/test_rehearsal_runtime.py`: one function per emulated semantic.

Only ever imported under the rehearsal (`scripts/modal-rehearsal --app
tests.rehearsal_app`), where `modal` is `rehearsal.fake_modal`. Functions leave marks in
`SAMPLE_DIR` (attempts, cancellations) so a test can see what ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import modal

app = modal.App("sample")
secret = modal.Secret.from_name("sample", required_keys=["SAMPLE_SECRET"])
SHORT_IDLE = 2  # scaledown_window: containers go soon after a test


def scratch() -> Path:
    return Path(os.environ["SAMPLE_DIR"])


def attempt(tag: str) -> int:
    """Count this attempt at `tag`; returns its number (1 for the first)."""
    marks = scratch() / f"attempts-{tag}"
    with marks.open("a") as file:
        file.write(f"{os.getpid()}\n")
    return len(marks.read_text().splitlines())


@app.function(max_containers=1, scaledown_window=SHORT_IDLE)
@modal.batched(max_batch_size=3, wait_ms=1000)
def batch_add(xs: list[int], ys: list[int]) -> list[tuple[int, int]]:
    return [(x + y, len(xs)) for x, y in zip(xs, ys, strict=True)]


@app.function(max_containers=1, scaledown_window=SHORT_IDLE)
@modal.batched(max_batch_size=4, wait_ms=4000)
def gather(xs: list[str]) -> list[int]:
    return [len(xs)] * len(xs)


@app.function(scaledown_window=SHORT_IDLE)
@modal.batched(max_batch_size=3, wait_ms=3000)
def held(xs: list[str]) -> list[str]:
    try:
        time.sleep(60)
    except modal.exception.InputCancellation:
        for x in xs:
            (scratch() / f"cancelled-{x}").touch()
        raise
    return xs


@app.function(
    retries=modal.Retries(max_retries=2, initial_delay=0.0, backoff_coefficient=1.0),
    scaledown_window=SHORT_IDLE,
)
def always_fails(tag: str) -> None:
    raise ValueError(f"attempt {attempt(tag)} of {tag} failed")


@app.function(retries=1, scaledown_window=SHORT_IDLE)
@modal.batched(max_batch_size=2, wait_ms=3000)
def fails_once(xs: list[str]) -> list[str]:
    tries = [attempt(x) for x in xs]
    if 1 in tries:
        raise RuntimeError(f"first attempt of one of {xs}")
    return [f"{x}:{n}" for x, n in zip(xs, tries, strict=True)]


@app.function(timeout=3, scaledown_window=SHORT_IDLE)
def slow_once(tag: str, first_s: float, then_s: float) -> int:
    n = attempt(tag)
    time.sleep(first_s if n == 1 else then_s)
    return n


@app.function(timeout=1, retries=1, scaledown_window=SHORT_IDLE)
def too_slow(tag: str) -> None:
    attempt(tag)
    time.sleep(30)


@app.function(max_containers=2, scaledown_window=SHORT_IDLE)
def hold(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@app.function(schedule=modal.Period(hours=1), scaledown_window=SHORT_IDLE)
async def tick() -> None:
    await asyncio.sleep(1.5)


@app.cls(enable_memory_snapshot=True, scaledown_window=SHORT_IDLE)
class Leaky:
    """Opens a connection before the snapshot: the rehearsal must refuse it."""

    @modal.enter(snap=True)
    def connect(self) -> None:
        self.conn = socket.create_connection(("127.0.0.1", int(os.environ["SAMPLE_LISTENER"])))

    @modal.method()
    def run(self) -> str:
        return "never"


@app.cls(enable_memory_snapshot=True, scaledown_window=SHORT_IDLE, secrets=[secret])
class Tidy:
    """Connects after the snapshot, as the product must."""

    @modal.enter(snap=True)
    def load(self) -> None:
        self.order = ["snap=True"]

    @modal.enter(snap=False)
    def connect(self) -> None:
        self.order.append("snap=False")
        self.conn = socket.create_connection(("127.0.0.1", int(os.environ["SAMPLE_LISTENER"])))

    @modal.method()
    def run(self) -> list[str]:
        return [*self.order, os.environ["SAMPLE_SECRET"]]

    @modal.exit()
    def leave(self) -> None:
        (scratch() / f"exited-{os.getpid()}").touch()


@app.function(image=modal.Image.debian_slim().pip_install("boto3"), scaledown_window=SHORT_IDLE)
def only_boto3() -> dict[str, Any]:
    """What a container of an image that installs boto3 alone can import."""
    import importlib.util

    import boto3

    try:
        import numpy  # noqa: F401 - installed on this machine, not in this image
    except ModuleNotFoundError as err:
        numpy_error = str(err)
    return {
        "boto3": boto3.__name__,
        "numpy": numpy_error,
        "numpy_spec": importlib.util.find_spec("numpy") is None,
    }


@app.cls(enable_memory_snapshot=True, scaledown_window=SHORT_IDLE)
class Restored:
    """Two containers of it: restored from one snapshot, so `snap=True` ran once."""

    @modal.enter(snap=True)
    def load(self) -> None:
        self.snapshot_pid = os.getpid()

    @modal.method()
    def run(self, seconds: float) -> tuple[int, int]:
        time.sleep(seconds)
        return self.snapshot_pid, os.getpid()


@app.cls(gpu="any", scaledown_window=SHORT_IDLE)
class Gpu:
    @modal.batched(max_batch_size=2, wait_ms=500)
    def run(self, xs: list[int]) -> list[int]:
        time.sleep(0.5)
        return [os.getpid()] * len(xs)


@app.function(scaledown_window=SHORT_IDLE)
def echo(x: Any) -> Any:
    return x


@app.function(min_containers=1, scaledown_window=SHORT_IDLE)
def warm() -> int:
    return os.getpid()


@app.function(scaledown_window=SHORT_IDLE)
def timed_calls(statements: int) -> dict[str, float]:
    """Seconds spent in `statements` database statements, one bucket call, one spawn."""
    import boto3
    import sqlalchemy

    engine = sqlalchemy.create_engine("sqlite://")
    with engine.connect() as conn:
        started = time.perf_counter()
        for _ in range(statements):
            conn.exec_driver_sql("select 1")
        db = time.perf_counter() - started
    s3 = boto3.client("s3", endpoint_url=os.environ["SAMPLE_S3_ENDPOINT"], region_name="us-east-1")
    started = time.perf_counter()
    s3.list_buckets()
    bucket = time.perf_counter() - started
    started = time.perf_counter()
    echo.spawn(1)
    return {"db": db, "bucket": bucket, "modal": time.perf_counter() - started}


inflight = {"now": 0, "peak": 0}


async def web_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`/slow?s=SECONDS` answers after that long; `/secret` answers SAMPLE_SECRET."""
    if scope["type"] != "http":
        return
    inflight["now"] += 1
    inflight["peak"] = max(inflight["peak"], inflight["now"])
    try:
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
        if scope["path"] == "/slow":
            await asyncio.sleep(float(query.get("s", "0")))
        body = {"pid": os.getpid(), "peak": inflight["peak"], "secret": os.environ["SAMPLE_SECRET"]}
    finally:
        inflight["now"] -= 1
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


@app.function(max_containers=1, scaledown_window=SHORT_IDLE, secrets=[secret])
@modal.concurrent(max_inputs=2)
@modal.asgi_app()
def web() -> Any:
    return web_app
