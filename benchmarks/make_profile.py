"""Make a `GpuProfile` for `magicmix plan` on this machine: seconds per batch, cold start.

    python -m benchmarks.make_profile --out benchmarks/results/profile-<machine>-<date>.json
    MAGICMIX_DEVICE=cpu python -m benchmarks.make_profile --width 256 --height 256 --out FILE

Times the engine exactly as the `MAGICMIX_*` settings configure it (model, device, dtype,
compile, channels_last; `magicmix.config.Settings`): one warm-up per batch size, then
`--repeats` rounds over the sizes, interleaved, medians kept. Defaults are the seed example
(768x768, 20 steps, kmin 0.3, kmax 0.5) and batch sizes 1, 2, 4, 8; the tiny CPU model is
better measured at 256. Also timed: the runner's host work per image (decode, PNG encode,
local store) and this process's cold start, split into process start -> this module,
imports, model load, and the first batch's extra time over a warm one. On Modal a cold
start is a memory-snapshot restore instead (docs/deploy.md): pass `magicmix plan
--cold-start-s` for that, or edit the profile.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: they are part of the cold start

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.measure import time_batches, time_host_work  # noqa: E402
from magicmix.planner.profile import GpuProfile  # noqa: E402


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc); 0 where unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.make_profile", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--name", default="", help="profile name (default: from the device)")
    parser.add_argument("--sizes", default="1,2,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kmin", type=float, default=0.3)
    parser.add_argument("--kmax", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per size")
    parser.add_argument("--price", type=float, default=None, help="$ per GPU-hour to record")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's own)"
    )
    parser.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="a new prompt every run (text encoding paid each time, as benchmarks/gpu.py)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    sizes = sorted({int(part) for part in args.sizes.split(",") if part.strip()})
    before_imports = time.perf_counter()
    import torch

    from magicmix.config import Settings
    from magicmix.engine.configure import load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings()
    imported = time.perf_counter()
    log(f"loading {settings.model} on {settings.device} (dtype {settings.dtype})")
    engine = load_engine(settings)
    loaded = time.perf_counter()
    log(f"timing batches {sizes} at {args.width}x{args.height}, {args.steps} steps")
    timings = time_batches(
        engine,
        sizes,
        width=args.width,
        height=args.height,
        steps=args.steps,
        kmin=args.kmin,
        kmax=args.kmax,
        repeats=args.repeats,
        fresh_prompts=args.fresh_prompts,
        log=log,
    )
    host = time_host_work(width=args.width, height=args.height, output=timings[sizes[-1]].output)
    described = engine.describe()
    if described.get("device", "").startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    device += (
        f" (torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" model {described.get('model')}, {described.get('dtype')})"
    )
    smallest = timings[sizes[0]]
    parts = {
        "process_start_s": round(process_age_s() - (time.perf_counter() - T0), 4),
        "imports_s": round(imported - T0, 4),
        "load_s": round(loaded - imported, 4),
        "first_batch_warmup_s": round(max(0.0, smallest.first_s - smallest.median_s), 4),
    }
    parts["process_start_s"] = max(0.0, parts["process_start_s"])
    profile = GpuProfile(
        name=args.name or re.sub(r"[^a-z0-9]+", "-", f"{device.split(' (')[0]}".lower()).strip("-"),
        device=device,
        measured_on=datetime.now(UTC).date(),
        source=(
            "python -m benchmarks.make_profile "
            + " ".join(argv if argv is not None else sys.argv[1:])
            + f" (host {platform.node()}); MAGICMIX_MODEL={settings.model},"
            f" compile={settings.compile}, channels_last={settings.channels_last}"
        ),
        request={
            "model": settings.model,
            "width": args.width,
            "height": args.height,
            "steps": args.steps,
            "kmin": args.kmin,
            "kmax": args.kmax,
            "fresh_prompts": str(args.fresh_prompts),
        },
        per_batch_s={size: round(t.median_s, 4) for size, t in timings.items()},
        per_image_overhead_s=round(sum(host.values()), 4),
        cold_start_s=round(sum(parts.values()), 4),
        cold_start_parts=parts,
        cold_start_measured=list(parts),
        price_per_gpu_hour=args.price,
        notes=[
            "per_batch_s: median of "
            f"{args.repeats} runs per size after one warm-up each; every run: "
            + ", ".join(f"b{s}={[round(x, 3) for x in t.runs_s]}" for s, t in timings.items()),
            "per_image_overhead_s: "
            + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in host.items())
            + " (S3 upload and job-record writes not timed).",
            f"cold start: this process (imports started {before_imports - T0:.2f}s after the"
            " module); load_s includes building the tiny model on first use. A Modal cold"
            " start restores a memory snapshot instead.",
        ],
    )
    path = profile.save(args.out)
    log(f"wrote {path}")
    print(profile.model_dump_json(indent=2))
    return path


if __name__ == "__main__":
    main()
