"""Compose the service from local parts: SQLite jobs and keys, a worker thread, the store."""

from __future__ import annotations

import logging

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.db import Database
from magicmix.engine import EngineOptions, MagicMixEngine
from magicmix.jobs import SqliteJobStore
from magicmix.keys import SqliteKeyStore
from magicmix.runner import JobRunner
from magicmix.service import MagicMixService
from magicmix.storage import open_store
from magicmix.worker import LocalWorker


def load_engine(settings: Settings) -> MagicMixEngine:
    """The engine as configured by `MAGICMIX_*` (model, device, dtype, fast path)."""
    return MagicMixEngine.load(
        settings.model,
        data_dir=settings.data_dir,
        device=settings.device,
        dtype=settings.dtype,
        text_cache_size=settings.text_cache_size,
        revision=settings.model_revision,
        options=engine_options(settings),
    )


def engine_options(settings: Settings) -> EngineOptions:
    """The fast-path switches that `MAGICMIX_*` controls."""
    return EngineOptions(
        compile=settings.compile,
        channels_last=settings.channels_last,
        batch_invariant=settings.batch_invariant,
    )


def open_key_store(settings: Settings) -> SqliteKeyStore:
    secret = settings.secret_key_bytes()
    return SqliteKeyStore(
        Database(settings.database_path), SecretBox(secret), secret, settings.static_api_keys
    )


def build_local_service(settings: Settings) -> MagicMixService:
    """Everything `magicmix serve` runs, in this process."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    secret = settings.secret_key_bytes()
    box = SecretBox(secret)
    db = Database(settings.database_path)
    jobs = SqliteJobStore(db)
    keys = SqliteKeyStore(db, box, secret, settings.static_api_keys)
    outputs = open_store(settings)
    runner = JobRunner(settings=settings, jobs=jobs, outputs=outputs, keys=keys, box=box)
    worker = LocalWorker(
        jobs=jobs,
        runner=runner,
        load_engine=lambda: load_engine(settings),
        batch_size=settings.batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    return MagicMixService(
        settings=settings, jobs=jobs, keys=keys, outputs=outputs, worker=worker, box=box
    )
