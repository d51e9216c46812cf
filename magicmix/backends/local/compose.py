"""The local composition root: SQLite jobs and keys, a worker thread, the configured store.

`magicmix serve` runs `build_local_service`; the CLI's key and cleanup commands use the
smaller pieces, so they never load a model or import torch.
"""

from __future__ import annotations

from magicmix.backends.local.db import Database
from magicmix.backends.local.jobs import SqliteJobStore
from magicmix.backends.local.keys import SqliteKeyStore
from magicmix.backends.local.worker import LocalWorker
from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.families import resolve_family
from magicmix.http.links import HttpLinks
from magicmix.jobs import QueueLimits
from magicmix.lifecycle import Lifecycle
from magicmix.logs import configure_logging
from magicmix.outputs.store import open_store
from magicmix.runner import Engine, JobRunner
from magicmix.service import MagicMixService
from magicmix.webhooks import WebhookPump, WebhookSender

WEBHOOK_IDLE_S = 2.0  # how often the local pump looks for due retries


def queue_limits(settings: Settings) -> QueueLimits:
    return QueueLimits(settings.max_queue, settings.max_queued_per_key)


def open_key_store(settings: Settings) -> SqliteKeyStore:
    secret = settings.secret_key_bytes()
    return SqliteKeyStore(
        Database(settings.database_path), SecretBox(secret), secret, settings.static_api_keys
    )


def open_lifecycle(settings: Settings) -> Lifecycle:
    """The job lifecycle over the local database, without a worker (for `magicmix cleanup`)."""
    return Lifecycle(SqliteJobStore(Database(settings.database_path)), queue_limits(settings))


def load_engine(settings: Settings) -> Engine:
    """The configured engine; torch is imported here, when a worker starts, not before."""
    from magicmix.engine.configure import load_engine as load

    return load(settings)


def build_local_service(settings: Settings) -> MagicMixService:
    """Everything `magicmix serve` runs, in this process."""
    configure_logging(settings.log_level)
    secret = settings.secret_key_bytes()
    box = SecretBox(secret)
    db = Database(settings.database_path)
    jobs = SqliteJobStore(db)
    keys = SqliteKeyStore(db, box, secret, settings.static_api_keys)
    lifecycle = Lifecycle(jobs, queue_limits(settings))
    outputs = open_store(settings)
    family = resolve_family(settings.model, settings.model_family, revision=settings.model_revision)
    links = HttpLinks(settings.public_url)
    runner = JobRunner(
        settings=settings, lifecycle=lifecycle, outputs=outputs, keys=keys, box=box, links=links
    )
    worker = LocalWorker(
        family=family.name,
        lifecycle=lifecycle,
        runner=runner,
        load_engine=lambda: load_engine(settings),
        batch_size=settings.batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    pump = WebhookPump(WebhookSender(jobs, keys, settings), idle_s=WEBHOOK_IDLE_S)
    lifecycle.listen(pump.nudge)
    service = MagicMixService(
        settings=settings,
        lifecycle=lifecycle,
        keys=keys,
        outputs=outputs,
        dispatcher=worker,
        box=box,
        links=links,
        family=family,
    )
    service.add_background(pump.run_forever)
    service.add_background(service.sweep_forever)
    return service
