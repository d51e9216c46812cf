"""Cold start (e): a new process to its first image, with and without the model prebuilt.

A scale-to-zero deployment pays this on every cold request, so it is billed like compute.
Each figure runs the real command line as a subprocess and times it from spawn:
`python -m magicmix mix` until it exits with the PNG written, and `python -m magicmix serve`
until its first `magic_mix` reply with status `success`. "Build first" starts from an empty
MAGICMIX_DATA_DIR, so the tiny model is built on first use; "prebuilt" reuses that dir.
Importing the stack alone is timed too, to show where a CPU cold start goes.

    python -m benchmarks.coldstart [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import os
import subprocess  # nosec B404 - runs this repo's own CLI with fixed arguments
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from benchmarks.common import (
    TORCH_THREADS,
    Comparison,
    Context,
    Section,
    benchmark,
    layout_png,
    log,
    run_suite,
    seed_body,
    timed,
)
from tests.http_fixtures import free_port
from tests.service_fixtures import MIX

SIZE = 256  # start-up is what is measured; 768 would add ~10 s of compute to every figure
BENCH_KEY = "mm_coldstart_bench_key"
START_TIMEOUT_S = 300.0
IMPORTS = ["-c", "import magicmix.cli, magicmix.engine.configure"]  # what a prebuilt `mix` imports
MIX_ARGS = ["--prompt", "Bed", "--negative-prompt", "low quality", "--seed", "1829183163"]


def child_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The child's environment: `tiny` in `data_dir`, CPU, the suite's thread count."""
    return {
        **os.environ,
        "MAGICMIX_MODEL": "tiny",
        "MAGICMIX_DATA_DIR": str(data_dir),
        "MAGICMIX_DEVICE": "cpu",
        "MAGICMIX_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": str(TORCH_THREADS),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def run_child(args: list[str], env: dict[str, str]) -> None:
    """Run `python args...` to completion; a failure stops the benchmark with its stderr."""
    done = subprocess.run(  # nosec B603 - fixed argv, no shell
        [sys.executable, *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[:3]} exited {done.returncode}: {done.stderr[-2000:]}")


def mix_once(layout: Path, data_dir: Path, out: Path) -> float:
    """Seconds from spawning `magicmix mix` to its exit with the PNG written."""
    args = ["-m", "magicmix", "mix", "--image", str(layout), "--out", str(out), *MIX_ARGS]
    args += ["--width", str(SIZE), "--height", str(SIZE)]
    out.unlink(missing_ok=True)
    seconds = timed(lambda: run_child(args, child_env(data_dir)))
    if not out.is_file():
        raise RuntimeError(f"magicmix mix exited 0 but wrote no {out}")
    return seconds


def serve_once(data_dir: Path, body: dict[str, str | int | float | None]) -> float:
    """Seconds from spawning `magicmix serve` to its first successful magic_mix reply."""
    port = free_port()
    env = child_env(
        data_dir, MAGICMIX_API_KEYS=BENCH_KEY, MAGICMIX_PUBLIC_URL=f"http://127.0.0.1:{port}"
    )
    args = [sys.executable, "-m", "magicmix", "serve", "--host", "127.0.0.1", "--port", str(port)]
    start = time.perf_counter()
    process = subprocess.Popen(  # nosec B603 - fixed argv, no shell
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        with httpx.Client(timeout=START_TIMEOUT_S) as http:
            while time.perf_counter() - start < START_TIMEOUT_S:
                if process.poll() is not None:
                    raise RuntimeError(f"magicmix serve exited: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]
                try:
                    reply = http.post(f"http://127.0.0.1:{port}{MIX}", json=body).json()
                except httpx.TransportError:  # not listening yet
                    time.sleep(0.02)
                    continue
                if reply.get("status") != "success":
                    raise RuntimeError(f"first magic_mix did not succeed: {reply}")
                return time.perf_counter() - start
        raise RuntimeError(f"magicmix serve gave no reply within {START_TIMEOUT_S}s")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@benchmark("e", "cold start: process spawn to first image, model built on first use vs prebuilt")
def cold_start(ctx: Context, out: Section) -> None:
    """Mix CLI and server, each from an empty data dir and then from the same dir, built."""
    repeats = 1 if ctx.quick else 2
    root = ctx.work_dir / "coldstart"
    root.mkdir()
    layout = root / "layout.png"
    layout.write_bytes(layout_png(SIZE))
    body = seed_body(BENCH_KEY, layout.read_bytes(), SIZE)
    samples: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)
        log(f"  {name}: {seconds:.2f}s")

    for index in range(repeats):
        mix_dir, serve_dir = root / f"mix-{index}", root / f"serve-{index}"
        record("mix, build first", mix_once(layout, mix_dir, root / "out.png"))
        record("mix, prebuilt", mix_once(layout, mix_dir, root / "out.png"))
        record("serve, build first", serve_once(serve_dir, body))
        record("serve, prebuilt", serve_once(serve_dir, body))
        record("imports only", timed(lambda: run_child(IMPORTS, child_env(root / "none"))))

    for command in ("mix", "serve"):
        out.comparisons.append(
            Comparison(
                case=f"magicmix {command}, {SIZE}x{SIZE}",
                unit="s",
                label="build first (empty data dir)",
                samples=samples[f"{command}, build first"],
                baseline_label="prebuilt model",
                baseline_samples=samples[f"{command}, prebuilt"],
            )
        )
    out.comparisons.append(
        Comparison(
            case="share of a prebuilt `mix` start",
            unit="s",
            label="imports only (magicmix.cli, .engine.configure)",
            samples=samples["imports only"],
            baseline_label="mix, prebuilt",
            baseline_samples=samples["mix, prebuilt"],
        )
    )
    out.notes += [
        f"`mix` times spawn to exit with the PNG written; `serve` times spawn to the first"
        f" `success` reply (POSTs retried until the port listens). {SIZE}x{SIZE}, seed example.",
        "On a CPU there is no fast-start path besides the prebuilt model: the deployment's one"
        " is Modal's memory snapshot (weights restored into RAM, modal_backend.load_weights),"
        " which needs Modal and is not measured here. What the rest of a cold start costs is"
        " mostly importing torch/diffusers/transformers: see the `imports only` row.",
    ]


def cold_start_parts(model_dir: Path, cache: Path, size: int) -> dict[str, float]:
    """One fresh process: where its cold start goes, with `cache` as the compile cache."""
    env = child_env(
        cache.parent,
        MAGICMIX_MODEL=str(model_dir),
        MAGICMIX_COMPILE_CACHE_DIR=str(cache),
        SPAWNED_AT=repr(time.time()),
    )
    done = subprocess.run(  # nosec B603 - fixed argv, no shell
        [sys.executable, "-m", "benchmarks.coldstart_child", str(size)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {done.stderr[-2000:]}")
    parts: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return parts


@benchmark("f", "cold start, part by part; torch.compile from scratch vs from its cache")
def compile_cache(ctx: Context, out: Section) -> None:
    """Fresh processes with MAGICMIX_COMPILE=true: an empty compile cache, then a filled one."""
    root = ctx.work_dir / "compile-cache"
    root.mkdir()
    for size in (256,) if ctx.quick else (256, 768):
        cache = root / f"cache-{size}"
        scratch = cold_start_parts(ctx.model_dir, cache, size)
        cached = cold_start_parts(ctx.model_dir, cache, size)
        if scratch["cache hit"] or not cached["cache hit"]:
            raise RuntimeError(f"expected a miss then a hit, got {scratch} then {cached}")
        log(f"  {size}px from scratch: {scratch}")
        log(f"  {size}px from the cache: {cached}")
        out.details[f"parts_{size}"] = {"from scratch": scratch, "from the cache": cached}
        out.comparisons.append(
            Comparison(
                case=f"compile warm-up, tiny model, {size}x{size}, batch bucket 1",
                unit="s",
                label="from the compile cache",
                samples=[cached["compile (or cache)"]],
                baseline_label="from scratch",
                baseline_samples=[scratch["compile (or cache)"]],
            )
        )
        cold = sum(v for k, v in cached.items() if k != "cache hit")
        cold_scratch = sum(v for k, v in scratch.items() if k != "cache hit")
        out.comparisons.append(
            Comparison(
                case=f"cold start to the first image, compiled, {size}x{size}",
                unit="s",
                label="with the cache",
                samples=[cold],
                baseline_label="without",
                baseline_samples=[cold_scratch],
            )
        )
    out.notes += [
        "Each run is a new process with a new TORCHINDUCTOR work dir; 'from the cache' finds"
        " the key's directory the first run published (engine/compile_cache.py). Parts:"
        " process start, imports, weights from disk, to the device (CPU: nothing to move),"
        " compile or cache, the first image. On Modal the weights part is the memory"
        " snapshot's restore and 'to the device' the copy to the GPU (not measured here).",
    ]


BENCHES = (cold_start, compile_cache)


def main(argv: Sequence[str] | None = None) -> None:
    run_suite(BENCHES, argv, default_out=None)


if __name__ == "__main__":
    main()
