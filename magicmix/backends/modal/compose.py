"""The Modal composition roots: what each kind of container builds, and nothing more.

Every container opens the same SQL store (`MAGICMIX_DATABASE_URL`, a managed PostgreSQL:
containers share no disk) and builds the same lifecycle over it; Modal holds no state.

- `web_service`: the service behind the FastAPI app (web function; no torch);
- `job_runner`: the GPU class's runner (the engine is `gpu.py`'s);
- `deliver_webhooks`, `run_sweep`: the bodies of the webhook and scheduled functions.

Connections are opened on first use, inside the function bodies and post-snapshot
`enter` methods that call `modal_parts`, never at import: a memory snapshot holds none.
Each function passes the pool it needs (`POOLS`), so the database's connection limit
can be budgeted (docs/deploy.md, "Database connections").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from magicmix.backends.base import EngineInfo
from magicmix.backends.modal.dispatch import GpuCalls, ModalDispatcher
from magicmix.config import Settings
from magicmix.families import ModelFamily, resolve_family
from magicmix.http.links import HttpLinks
from magicmix.jobs import JobRecord
from magicmix.lifecycle import Lifecycle
from magicmix.logs import configure_logging
from magicmix.outputs.routing import OutputRouter
from magicmix.runner import JobRunner
from magicmix.service import MagicMixService
from magicmix.store.database import PoolSize
from magicmix.store.stores import Stores, open_stores
from magicmix.sweep import Sweeper, SweepReport
from magicmix.webhooks import WebhookDelivery

log = logging.getLogger(__name__)

SEND_AGAIN_WITHIN_S = 60.0  # the webhook function stays for retries due this soon itself
# Connections per container of each function: the web function serves 64 requests at once,
# each holding a connection only for one short statement; the GPU class needs its batch's
# statements, the lease heartbeat and the output stores' threads.
POOLS = {
    "web": PoolSize(size=10, overflow=10),
    "gpu": PoolSize(size=2, overflow=4),
    "webhooks": PoolSize(size=4, overflow=4),
    "sweep": PoolSize(size=2, overflow=4),
    "keys": PoolSize(size=1, overflow=0),
}


@dataclass
class WebhookNudges:
    """The lifecycle's `Notifier` on Modal: jobs that ended here with a webhook start the
    webhook function (one spawn per statement that ended jobs, or per `batch()` block)."""

    spawn: Callable[[], object]
    _held: int = 0
    _owed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ended(self, jobs: Sequence[JobRecord]) -> None:
        if not any(job.webhook is not None for job in jobs):
            return
        with self._lock:
            self._owed = True
        self._flush()  # unless inside a `batch()` block, which flushes at its end

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Ends inside the block start the webhook function once, at its end."""
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            if self._held or not self._owed:
                return
            self._owed = False
        try:
            self.spawn()
        except Exception:  # the sweep delivers what is due anyway
            log.exception("could not spawn the webhook function")


@dataclass(frozen=True)
class ModalParts:
    """What every container shares: settings, stores, the lifecycle."""

    settings: Settings
    stores: Stores
    lifecycle: Lifecycle
    outputs: OutputRouter
    links: HttpLinks
    nudges: WebhookNudges

    @property
    def family(self) -> ModelFamily:
        """The deploy-time family (MAGICMIX_MODEL_FAMILY); the GPU class checks it."""
        return resolve_family(self.settings.model, self.settings.model_family)


def modal_settings(web_url: str | None) -> Settings:
    """Settings from the environment; `public_url` defaults to the web function's URL."""
    settings = Settings()
    if "public_url" not in settings.model_fields_set and web_url:
        settings = settings.model_copy(update={"public_url": web_url.rstrip("/")})
    return settings


def modal_parts(
    settings: Settings, spawn_webhooks: Callable[[], object], *, pool: PoolSize
) -> ModalParts:
    """The shared parts; refuses settings that cannot work on Modal."""
    missing = [
        name
        for name, value in (
            ("MAGICMIX_SECRET_KEY", settings.secret_key),
            ("MAGICMIX_DATABASE_URL", settings.database_url),
        )
        if value is None
    ]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not set: add them to the `magicmix` Modal secret (every"
            " container must share the database and the secret; docs/deploy.md step 2)"
        )
    if not (settings.store_url or "").startswith("s3://"):
        raise RuntimeError(
            "MAGICMIX_STORE_URL must be s3://bucket/prefix on Modal (containers share no"
            " disk): add it to the `magicmix-s3` Modal secret"
        )
    if settings.effective_database_url.startswith("sqlite"):
        raise RuntimeError(
            "MAGICMIX_DATABASE_URL must be a PostgreSQL URL on Modal (containers share no"
            " disk): postgresql://user:password@host:port/db"
        )
    configure_logging(settings.log_level)
    stores = open_stores(settings, pool=pool)
    nudges = WebhookNudges(spawn_webhooks)
    lifecycle = Lifecycle.configured(stores.jobs, settings, notifier=nudges)
    links = HttpLinks(settings.public_url)
    return ModalParts(
        settings=settings,
        stores=stores,
        lifecycle=lifecycle,
        outputs=OutputRouter.open(
            settings, details=stores.keys, box=stores.box, service_url=links.output
        ),
        links=links,
        nudges=nudges,
    )


def dispatcher(parts: ModalParts, gpu: GpuCalls, *, gpu_name: str) -> ModalDispatcher:
    dtype = "float16" if parts.settings.dtype == "auto" else parts.settings.dtype
    return ModalDispatcher(
        lifecycle=parts.lifecycle,
        gpu=gpu,
        engine=EngineInfo(
            model=parts.settings.model,
            family=parts.family.name,
            device=f"cuda ({gpu_name} on Modal)",
            dtype=dtype,
        ),
    )


def web_service(parts: ModalParts, gpu: GpuCalls, *, gpu_name: str) -> MagicMixService:
    """The service of the web function: no engine, no background loops (the cron sweeps)."""
    return MagicMixService(
        settings=parts.settings,
        lifecycle=parts.lifecycle,
        keys=parts.stores.keys,
        outputs=parts.outputs,
        dispatcher=dispatcher(parts, gpu, gpu_name=gpu_name),
        links=parts.links,
        family=parts.family,
    )


def job_runner(parts: ModalParts) -> JobRunner:
    """The GPU class's runner: the same as the local worker's."""
    return JobRunner(settings=parts.settings, lifecycle=parts.lifecycle, outputs=parts.outputs)


def delivery(parts: ModalParts) -> WebhookDelivery:
    return WebhookDelivery.over(parts.stores.jobs, parts.stores.keys, parts.settings)


async def deliver_webhooks(parts: ModalParts) -> int:
    """The webhook function: every webhook due, and the retries due within a minute.

    Later retries are the sweep's (every few minutes), so no container waits for hours;
    deliveries are leased, so this function, its other runs and the sweep never send one
    attempt twice.
    """
    return await delivery(parts).run(until=time.time() + SEND_AGAIN_WITHIN_S)


async def run_sweep(parts: ModalParts, dispatch: ModalDispatcher) -> SweepReport:
    """The scheduled function: the shared sweep, plus re-spawning lost GPU calls and
    sending the webhooks due now."""

    async def webhooks() -> int:
        return await delivery(parts).run(until=time.time())

    sweeper = Sweeper(
        parts.lifecycle,
        parts.outputs.service,
        parts.settings,
        steps=[("respawn", dispatch.respawn_lost), ("webhooks", webhooks)],
    )
    report = await sweeper.run_once()
    log.info("sweep: %s", {"ran": report.ran, **report.extra, "errors": report.errors})
    return report


KeyCommand = Callable[..., str]
"""`cli.keys.key_action`: a key command on a key store, and the lines it prints."""


def manage_keys(
    parts: ModalParts, command: KeyCommand, action: str, *, key_id: str = "", admin: bool = False
) -> str:
    """`modal run modal_app.py::keys`: `command` on the deployment's key store.

    Runs in a Modal function (it needs the service secret to hash keys and encrypt their
    webhook secrets); the new key travels back as the function's result, never in a log.
    Errors travel back as plain `RuntimeError`s: a laptop with only `modal` installed
    cannot unpickle magicmix's own exceptions.
    """
    from magicmix.errors import MagicMixError

    try:
        return command(parts.stores.keys, action, key_id=key_id, admin=admin)
    except MagicMixError as err:
        raise RuntimeError(err.message) from None
