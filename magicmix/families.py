"""Model families: which Stable Diffusion a checkpoint is, from its `model_index.json`.

Torch-free, so the web tier (which has no weights) and the CLI (before a model loads)
agree with the engine on the family and so on the default output size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["sd1", "sdxl"]
DEFAULT_SIZE: dict[str, int] = {"sd1": 768, "sdxl": 1024}
TOY, TINY = "toy", "tiny"  # the models magicmix ships (trained) and builds (random weights)
BUILTIN = {TINY: "sd1", TOY: "sd1"}


def resolve_family(model: str, configured: str = "auto", *, revision: str | None = None) -> Family:
    """The family to size requests for: as configured, else detected, else SD 1.x."""
    if configured in DEFAULT_SIZE:
        return configured  # type: ignore[return-value]
    return detect_family(model, revision=revision) or "sd1"


def family_of(index: dict[str, Any]) -> Family:
    """SDXL pipelines have a second text encoder; everything else runs as SD 1.x."""
    second = index.get("text_encoder_2")
    return "sdxl" if isinstance(second, list) and second and second[0] else "sd1"


def detect_family(source: str, *, revision: str | None = None) -> Family | None:
    """The family of a built-in name, a diffusers folder or a cached hub id; None if unknown."""
    if source in BUILTIN:
        return BUILTIN[source]  # type: ignore[return-value]
    path = Path(source).expanduser() / "model_index.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache  # no download: the cache or nothing

        cached = try_to_load_from_cache(source, "model_index.json", revision=revision)
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    return family_of(json.loads(path.read_text()))
