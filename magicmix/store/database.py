"""Opening the one database by URL: SQLite on a laptop, PostgreSQL for many processes.

Both dialects go through SQLAlchemy Core with the same statements; what differs is kept
here, in one place:

- transactions: SQLite takes its write lock up front (`BEGIN IMMEDIATE`), so concurrent
  writers queue on the busy timeout instead of failing half-way; PostgreSQL runs at
  READ COMMITTED and the statements that must not interleave take a lock
  (`FOR UPDATE SKIP LOCKED` rows, or a transaction-scoped advisory lock);
- `exclusive(name)`: one holder across processes (the sweep): a transaction-scoped
  advisory lock on PostgreSQL, a lock on a file beside the database on SQLite; both are
  released by the operating system or the server if the holder dies;
- migrations (`migrate`): Alembic revisions in one transaction that holds the migration
  lock, so processes starting together upgrade once and the others find nothing to do;
- connections are opened on first use, never at construction, so a Modal memory
  snapshot taken after `open_database` holds no socket.

PostgreSQL URLs work through poolers in transaction mode (PgBouncer, Supavisor, Neon's
pooled endpoints): no session state is relied on, and psycopg's automatic server-side
prepared statements are off.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, create_engine, event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from magicmix.errors import Busy, StorageError

log = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgresql"]
MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class PoolSize:
    """Connections one process may hold: `size` kept open, `overflow` more at peaks."""

    size: int = 5
    overflow: int = 10


def parse_url(url: str) -> URL:
    """`postgresql://…` (or `postgres://`) and `sqlite:///path`, with the drivers we ship."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ValueError(f"not a database URL: {redact(url)}") from err
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("a SQLite database must be a file: sqlite:///path/to/file")
        return parsed.set(drivername="sqlite+pysqlite")
    raise ValueError(
        f"unsupported database {backend!r}: use postgresql://user:pass@host:port/db"
        " or sqlite:///path"
    )


def redact(url: str) -> str:
    """A database URL safe to log: no password, no query string."""
    try:
        return make_url(url).set(query={}).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


class Database:
    """One database, its connection pool and the dialect's few differences."""

    def __init__(self, engine: Engine, *, lock_dir: Path | None = None) -> None:
        self.engine = engine
        self.dialect: Dialect = "postgresql" if engine.dialect.name == "postgresql" else "sqlite"
        self._lock_dir = lock_dir

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A read-write transaction, committed on exit (SQLite: its write lock taken first)."""
        with _errors(self.dialect), self.engine.begin() as connection:
            yield connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads, each statement on its own (no BEGIN and COMMIT round
        trips; SQLite readers never take the write lock, so they never queue)."""
        with _errors(self.dialect), self.engine.connect() as connection:
            if self.dialect == "postgresql":
                connection.execution_options(isolation_level="AUTOCOMMIT")
            else:  # a local file: a deferred BEGIN costs nothing and never waits for writers
                connection.execution_options(sqlite_begin="DEFERRED")
            yield connection

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Whether this process is the one holder of `name` now (it does not wait)."""
        if self.dialect == "postgresql":
            with self.transaction() as connection:
                yield bool(connection.scalar(select(func.pg_try_advisory_xact_lock(lock_id(name)))))
            return
        assert self._lock_dir is not None  # nosec B101 - set for every SQLite database
        path = self._lock_dir / f".{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT that can take `ON CONFLICT` clauses (both dialects spell them alike)."""
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    def lock(self, connection: Connection, name: str) -> None:
        """Serialise this transaction with others that lock `name` (SQLite: already are)."""
        if self.dialect == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(lock_id(name))))

    def close(self) -> None:
        self.engine.dispose()


def lock_id(name: str) -> int:
    """A stable 63-bit advisory lock key per name, in magicmix's own range of keys."""
    return int.from_bytes(hashlib.sha256(b"magicmix:" + name.encode()).digest()[:8]) >> 1


@contextmanager
def _errors(dialect: Dialect) -> Iterator[None]:
    """Database trouble as the service's errors: busy (retry shortly) or down."""
    try:
        yield
    except OperationalError as err:
        if dialect == "sqlite" and "locked" in str(err.orig):
            raise Busy("the job database is busy; retry shortly", retry_after=1) from err
        raise StorageError("the job database is unavailable; retry shortly") from err
    except DBAPIError as err:
        if err.connection_invalidated:
            raise StorageError("the job database connection was lost; retry shortly") from err
        raise


def open_database(
    url: str,
    *,
    pool: PoolSize | None = None,
    busy_timeout_s: float = 10.0,
    migrate_schema: bool = True,
) -> Database:
    """The database at `url`, its schema brought up to date unless told otherwise."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = _open_sqlite(parsed, busy_timeout_s)
    else:
        database = _open_postgresql(parsed, pool or PoolSize())
    if migrate_schema:
        migrate(database)
    return database


def _open_sqlite(url: URL, busy_timeout_s: float) -> Database:
    path = Path(url.database or "").expanduser().resolve()
    _private_file(path)
    engine = create_engine(
        url.set(database=str(path)),
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # the "begin" listener below emits BEGIN
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return Database(engine, lock_dir=path.parent)


def _open_postgresql(url: URL, pool: PoolSize) -> Database:
    engine = create_engine(
        url,
        pool_size=pool.size,
        max_overflow=pool.overflow,
        pool_pre_ping=True,  # a pooled connection the server or a pooler dropped is replaced
        pool_recycle=300,
        connect_args={"connect_timeout": 10, "prepare_threshold": None},
    )
    return Database(engine)


def _private_file(path: Path) -> None:
    """The SQLite file (prompts, layout images, presigned URLs) readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(OSError):  # a directory we do not own keeps its mode
        if path.parent.stat().st_uid == os.getuid():
            path.parent.chmod(0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)  # also for a file made by an older version


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head() -> str:
    """The revision this code expects."""
    return str(_scripts().get_current_head())


def current_revision(database: Database) -> str | None:
    with database.read() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def migrate(database: Database) -> None:
    """Bring the schema to `head()`, once, whatever the number of processes starting."""
    if current_revision(database) == head():
        return
    with database.transaction() as connection:  # SQLite: the write lock is the migration lock
        database.lock(connection, "migrate")
        before = MigrationContext.configure(connection).get_current_revision()
        if before == head():
            return  # another process upgraded while this one waited for the lock
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    log.info("database schema upgraded from %s to %s", before or "nothing", head())
