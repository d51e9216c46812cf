"""Compiled graphs that outlive the process: torch.compile's caches, kept by key.

`torch.compile` spends minutes per batch size on a GPU (70-95 s on an H200) and minutes
on a CPU, and every new process starts with empty caches. What it produces (Inductor's
FX-graph and AOTAutograd caches, generated kernels and their compiled binaries, Triton's
kernels and autotuning) lands in `TORCHINDUCTOR_CACHE_DIR`. Here that directory is one per
`CompileKey` (everything that changes the compiled code: torch version, device, model,
dtype, sizes, batch buckets, engine options), kept under a store directory (locally
`MAGICMIX_DATA_DIR/compile-cache`; on Modal a Volume) so the next process finds it.

On the tiny model at 256 px on this 2-core CPU, a fresh process warmed up in 199 s from
scratch and in 11 s from its key's directory; PyTorch's portable `save_cache_artifacts`
blob alone brought only 143 s (it keeps no compiled C++), hence whole directories.

A directory is trusted only with a manifest (each file's SHA-256) that the process which
filled it wrote after a complete warm-up: a missing, torn or altered directory is wiped
and the warm-up compiles from scratch, so a bad cache costs time, never a crash or a
wrong graph (torch keys its own entries by graph within the directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MANIFEST = "magicmix-manifest.json"


@dataclass(frozen=True)
class CompileKey:
    """Everything a compiled graph depends on; its digest names the cache directory."""

    torch_version: str
    device: str  # "cuda NVIDIA H200 sm90", "cpu x86_64"
    model: str  # name and revision, or a folder's content digest
    dtype: str
    sizes: tuple[tuple[int, int], ...]  # (width, height) compiled for
    buckets: tuple[int, ...]  # UNet batch sizes compiled for
    options: str  # the engine options that change the graph

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def device_label(device: torch.device) -> str:
    """The device as compiled code sees it: kind, model and capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm{major}{minor}"
    return f"{device.type} {os.uname().machine}"


def model_label(source: str, revision: str | None) -> str:
    """A hub model by id and revision; a folder by the digest of its weights and configs."""
    folder = Path(source)
    if not folder.is_dir():
        return f"{source}@{revision or 'main'}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return f"folder:{digest.hexdigest()[:32]}"


class CompileCache:
    """Inductor cache directories by key: kept in `store`, used in `work` (may be the same).

    On Modal the store is a Volume and `work` the container's own disk: the warm-up never
    writes into the Volume, and a finished directory is published whole.
    """

    def __init__(self, store: Path, work: Path | None = None) -> None:
        self.store = store
        self.work = work or store

    def activate(self, key: CompileKey) -> bool:
        """Point torch at `key`'s directory, seeded from the store; True if it was complete."""
        stored, live = self.store / key.digest, self.work / key.digest
        hit = _complete(stored)
        if not hit and stored.exists():
            log.warning("compile cache %s is incomplete or altered; compiling from scratch", stored)
        if live != stored:
            shutil.rmtree(live, ignore_errors=True)
            if hit:
                shutil.copytree(stored, live)
        elif not hit:
            shutil.rmtree(live, ignore_errors=True)
        live.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(live)  # read by torch at each compile
        os.environ.pop("TRITON_CACHE_DIR", None)  # Triton's then lives inside it
        log.info("compile cache %s: %s", key.digest, "hit" if hit else "miss")
        return hit

    def publish(self, key: CompileKey) -> Path:
        """After a complete warm-up: seal `key`'s directory and keep it in the store."""
        stored, live = self.store / key.digest, self.work / key.digest
        (live / MANIFEST).write_text(json.dumps(_digests(live), sort_keys=True))
        if live != stored:
            partial = self.store / f".{key.digest}.{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(live, partial)
            shutil.rmtree(stored, ignore_errors=True)
            partial.rename(stored)
        log.info("compile cache %s published", key.digest)
        return stored


def _digests(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST and "locks" not in path.parts
    }


def _complete(directory: Path) -> bool:
    """Every file the manifest lists is there, byte for byte (torch may add more later)."""
    try:
        expected = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    for name, digest in expected.items():
        try:
            if hashlib.sha256((directory / name).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return bool(expected)
