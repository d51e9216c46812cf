"""`magicmix plan`: how long a burst takes to drain on the deployed system, and what it costs.

A small discrete-event simulation of the Modal deployment (`modal_app.py`): the web tier's
queue limits and 429s, Modal's autoscaler starting GPU containers with a cold start,
`@modal.batched` forming batches with its wait, per-batch GPU seconds measured on a real
card (a `GpuProfile`), idle scale-down, and per-second billing. Pure Python and
deterministic: no threads, no wall clock, no torch.

    profile = GpuProfile.load(default_profile_path())  # the shipped H200 profile
    result = simulate(profile, Capacity(max_containers=8), Arrivals.burst(1000))
    print(render_text(summarize(result, price_per_gpu_hour=4.54)))
"""

from __future__ import annotations

from magicmix.planner.profile import GpuProfile, default_profile_path
from magicmix.planner.report import Summary, render_text, summarize
from magicmix.planner.sim import Arrivals, Capacity, SimResult, simulate

__all__ = [
    "Arrivals",
    "Capacity",
    "GpuProfile",
    "SimResult",
    "Summary",
    "default_profile_path",
    "render_text",
    "simulate",
    "summarize",
]
