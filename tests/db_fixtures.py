"""Pytest plugin: one real PostgreSQL per session, and a database URL per test.

`database_url` is parametrised over both dialects, so a test that takes it runs on
SQLite and on PostgreSQL. PostgreSQL missing is an error that says how to install it,
never a skip: the PostgreSQL half of the suite is not optional.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from magicmix.store.testing import TempPostgres

DIALECTS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    with TempPostgres() as server:
        yield server


def url_for(dialect: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'magicmix.sqlite3'}"
    server: TempPostgres = request.getfixturevalue("postgres")
    return server.fresh_url()


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, migrated database: a SQLite file, or a PostgreSQL database."""
    return url_for(request.param, tmp_path, request)


@pytest.fixture
def pg_url(postgres: TempPostgres) -> str:
    """A new, migrated PostgreSQL database (for tests about PostgreSQL alone)."""
    return postgres.fresh_url()
