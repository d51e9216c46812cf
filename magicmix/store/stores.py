"""The stores of one deployment, opened from its settings (every composition root's call)."""

from __future__ import annotations

from dataclasses import dataclass

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.store.database import Database, PoolSize, open_database
from magicmix.store.jobs import SqlJobStore
from magicmix.store.keys import SqlKeyStore


@dataclass(frozen=True)
class Stores:
    database: Database
    jobs: SqlJobStore
    keys: SqlKeyStore
    box: SecretBox


def open_stores(settings: Settings, *, pool: PoolSize | None = None) -> Stores:
    """Jobs and keys in `MAGICMIX_DATABASE_URL` (default: SQLite in the data dir), the
    schema migrated if it is behind; `pool` sizes PostgreSQL's connections per process."""
    database = open_database(
        settings.effective_database_url,
        pool=pool or PoolSize(settings.db_pool_size, settings.db_max_overflow),
    )
    secret = settings.secret_key_bytes()
    box = SecretBox(secret)
    return Stores(
        database=database,
        jobs=SqlJobStore(database),
        keys=SqlKeyStore(database, box, secret, settings.static_api_keys),
        box=box,
    )
