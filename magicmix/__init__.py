"""MagicMix semantic image mixing (Liew et al. 2022) as a ModelsLab-compatible service."""

import os

__version__ = "0.1.0"

# Set before anything imports torch (OpenMP reads it once, at start). OpenMP's default
# lets idle worker threads spin; when the machine's cores are also busy with anything
# else (another process, our own web threads) the spinning threads fight the workers,
# and a tiny-model UNet call measured 1.5 s instead of 0.03 s on 2 shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
