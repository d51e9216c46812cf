"""One cold start, part by part: `SPAWNED_AT=<epoch s> python -m benchmarks.coldstart_child SIZE`.

Loads the model as `MAGICMIX_*` says (compile on, for SIZE x SIZE and the batch buckets up
to MAGICMIX_BATCH_SIZE), warms it up through the compile cache, mixes one image, and prints
the seconds of each part as JSON. benchmarks/coldstart.py runs it on the CPU; the prepared
GPU run (benchmarks/run_gpu_round2.sh) runs it on CUDA.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    started = time.time()
    import torch  # timed: the imports are a part of every cold start
    from PIL import Image

    from magicmix.config import Settings
    from magicmix.engine import MagicMixEngine
    from magicmix.engine.configure import engine_options, warm_up
    from magicmix.engine.loading import load_components, resolve_device, resolve_dtype
    from magicmix.request import MixRequest

    imported = time.time()
    size = int(sys.argv[1])
    settings = Settings(compile=True, compile_sizes=f"{size}x{size}")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    components = load_components(settings.model, device=torch.device("cpu"), dtype=dtype)
    loaded = time.time()
    for module in components.modules():
        module.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    moved = time.time()
    options = engine_options(settings)
    engine = MagicMixEngine(components, device=device, dtype=dtype, options=options)
    engine.source = settings.model
    warm = warm_up(engine, settings)
    warmed = time.time()
    image = Image.new("RGB", (size, size), (90, 90, 90))
    engine.mix([MixRequest(image=image, prompt="Bed", width=size, height=size, seed=1)])
    done = time.time()
    parts = {
        "process start": started - float(os.environ["SPAWNED_AT"]),
        "imports": imported - started,
        "weights from disk": loaded - imported,
        "to the device": moved - loaded,
        "compile (or cache)": warmed - moved,
        "first image": done - warmed,
        "cache hit": bool(warm.get("cache_hit")),
    }
    print(json.dumps(parts))


if __name__ == "__main__":
    main()
