"""Benchmarks of magicmix. Users pay per GPU-second, so every second we add is billed.

`python -m benchmarks` (`make bench`) is the CPU suite: the tiny model (built into a temp
dir; random weights, SD 1.x architecture), 2 torch threads, a few minutes on a laptop. Each
figure is measured next to its baseline in the same run, interleaved, and reported as a
ratio, because ratios survive a noisy or slower machine where absolute seconds do not:

(a) engine.py     the engine vs diffusers' img2img at strength = kmax on the same weights,
                  256 and 768: MagicMix must not cost more than the pipeline it extends.
(b) engine.py     the `MAGICMIX_*` defaults (SDPA, channels_last, batching, text cache) vs
                  the plain engine, and which part helps on a CPU.
(c) service.py    HTTP end to end vs the direct engine call: what the service adds per image.
(d) service.py    images/s at 1, 4 and 16 concurrent clients, cross-request batching on vs off.
(e) coldstart.py  process start to first image (CLI and server), model built vs prebuilt:
                  scale-to-zero pays this on every cold request.

The table goes to stdout and, with every sample and the machine (CPU, cores, versions, load
average), to results/cpu-<date>.json and .md. `gpu.py` is the separate full-size SD 1.5 GPU
benchmark. The service benchmarks start the app as the test suite does
(`tests/service_fixtures.py`), so they need the test extras (`make bench` installs them).
"""

import os

# Before diffusers/transformers are imported: never reach for a model hub, no fork warnings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
