"""Weights into the Volume: the files of a hub checkpoint that MagicMix reads, and no more."""

from __future__ import annotations

import logging

from huggingface_hub import snapshot_download

from magicmix.config import Settings

log = logging.getLogger(__name__)


def download_weights(settings: Settings) -> str:
    """Fill the Hugging Face cache (the Volume) for `MAGICMIX_MODEL` at its revision, with
    the files its family reads (`ModelFamily.hub_files`)."""
    family = settings.resolved_family()
    path = snapshot_download(
        settings.model, revision=settings.model_revision, allow_patterns=list(family.hub_files)
    )
    log.info("cached %s@%s in %s", settings.model, settings.model_revision or "main", path)
    return str(path)
