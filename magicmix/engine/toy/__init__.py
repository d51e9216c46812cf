"""The toy model: a Stable Diffusion 1.x of a few MB that has learned the toy world.

It ships in the package (`model/`, fp16 safetensors), so `MAGICMIX_MODEL=toy`, the local
default, starts in seconds with no hub and shows MagicMix doing something visible: it draws
a circle, square or triangle in red, green, blue or yellow on white (`world.py`). Every
file is checked against `model/SHA256SUMS` before it is loaded: a truncated checkout or an
edited weight fails loudly instead of mixing garbage. `magicmix build-toy DIR` retrains it
from scratch (`train.py`) and says whether the result matches the shipped files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MODEL_DIR = Path(__file__).with_name("model")
MANIFEST = "SHA256SUMS"


class ToyModelError(RuntimeError):
    """The shipped toy model is missing or does not match its manifest."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_files(directory: Path) -> list[str]:
    """Every file of a model folder but the manifest, as sorted POSIX paths."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def write_manifest(directory: Path) -> dict[str, str]:
    """Hash every file into `directory/SHA256SUMS` (the `sha256sum` format: `sha256sum -c`
    checks it too) and return path -> digest."""
    digests = {name: _digest(directory / name) for name in model_files(directory)}
    lines = "".join(f"{digest}  {name}\n" for name, digest in digests.items())
    (directory / MANIFEST).write_text(lines)
    return digests


def read_manifest(directory: Path) -> dict[str, str]:
    lines = (directory / MANIFEST).read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines if line)}


def verified_model_dir(directory: Path = MODEL_DIR) -> Path:
    """`directory` once every file matches the manifest, and no file is missing or extra."""
    if not (directory / MANIFEST).is_file():
        raise ToyModelError(f"the toy model's manifest {directory / MANIFEST} is missing")
    expected = read_manifest(directory)
    present = set(model_files(directory))
    if missing := sorted(set(expected) - present):
        raise ToyModelError(f"toy model files missing: {', '.join(missing)}")
    if extra := sorted(present - set(expected)):
        raise ToyModelError(f"toy model has files its manifest does not list: {', '.join(extra)}")
    if bad := [name for name, digest in expected.items() if _digest(directory / name) != digest]:
        raise ToyModelError(
            f"toy model files do not match their SHA-256 in {MANIFEST}: {', '.join(bad)}; "
            "restore them from git, or retrain with `magicmix build-toy DIR` and set "
            "MAGICMIX_MODEL=DIR"
        )
    return directory
