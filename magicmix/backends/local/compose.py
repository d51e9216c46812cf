"""The local composition root: the SQL store, a worker thread, the configured output store.

`magicmix serve` runs `build_local_service`; any number of them given the same database
URL and output store are one service (each replica's worker claims work, any replica
answers any job, one sweep runs at a time). The CLI's key and cleanup commands use the
smaller pieces, so they never load a model or import torch.
"""

from __future__ import annotations

from magicmix.backends.local.worker import LocalWorker
from magicmix.config import Settings
from magicmix.http.links import HttpLinks
from magicmix.lifecycle import Lifecycle
from magicmix.logs import configure_logging
from magicmix.outputs.routing import OutputRouter
from magicmix.outputs.store import open_store
from magicmix.runner import Engine, JobRunner
from magicmix.service import MagicMixService
from magicmix.store.keys import SqlKeyStore
from magicmix.store.stores import open_stores
from magicmix.sweep import Sweeper
from magicmix.webhooks import WebhookDelivery


def open_key_store(settings: Settings) -> SqlKeyStore:
    return open_stores(settings).keys


def open_sweeper(settings: Settings) -> Sweeper:
    """The sweep over the configured stores, without a worker (for `magicmix cleanup`)."""
    stores = open_stores(settings)
    lifecycle = Lifecycle.configured(stores.jobs, settings)
    return Sweeper(lifecycle, open_store(settings), settings)


def load_engine(settings: Settings) -> Engine:
    """The configured engine; torch is imported here, when a worker starts, not before."""
    from magicmix.engine.configure import load_engine as load

    return load(settings)


def build_local_service(settings: Settings) -> MagicMixService:
    """Everything `magicmix serve` runs, in this process."""
    configure_logging(settings.log_level)
    stores = open_stores(settings)
    lifecycle = Lifecycle.configured(stores.jobs, settings)
    family = settings.resolved_family()
    links = HttpLinks(settings.public_url)
    outputs = OutputRouter.open(
        settings, details=stores.keys, box=stores.box, service_url=links.output
    )
    runner = JobRunner(settings=settings, lifecycle=lifecycle, outputs=outputs)
    worker = LocalWorker(
        family=family.name,
        lifecycle=lifecycle,
        runner=runner,
        load_engine=lambda: load_engine(settings),
        batch_size=settings.batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    delivery = WebhookDelivery.over(stores.jobs, stores.keys, settings)
    lifecycle.notifiers.add(delivery)
    service = MagicMixService(
        settings=settings,
        lifecycle=lifecycle,
        keys=stores.keys,
        outputs=outputs,
        dispatcher=worker,
        links=links,
        family=family,
    )
    service.add_background(delivery.run_forever)
    service.add_background(Sweeper(lifecycle, outputs.service, settings).run_forever)
    return service
