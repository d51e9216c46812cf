"""The schema: versioned, migrated in place with nothing lost, safe when processes race.

- a data dir the previous release left (SQLite, its `user_version` 2), and one of its
  first version, open with every row kept and working: keys authenticate, queued jobs
  are claimed in batches, a job its process left running is requeued by the first sweep,
  an owed webhook goes, an Idempotency-Key answers with its job;
- several processes opening one new database at the same moment migrate it once;
- the tables the queries use (`store/schema.py`) are the tables the migrations make, on
  both dialects.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from magicmix.crypto import SecretBox
from magicmix.jobs import Idempotency, JobResult, JobStatus, QueueLimits, WebhookState
from magicmix.lifecycle import Lifecycle
from magicmix.store.database import current_revision, head, open_database
from magicmix.store.jobs import SqlJobStore
from magicmix.store.keys import SqlKeyStore
from magicmix.store.schema import metadata
from tests.db_fixtures import DIALECTS
from tests.legacy_release import add_job, add_key, make_database
from tests.test_jobs import params

SECRET = b"the-previous-release-secret"


@pytest.mark.parametrize("user_version", [2, 0])
def test_a_data_dir_of_the_previous_release_migrates_in_place_with_nothing_lost(
    tmp_path: Path, user_version: int
) -> None:
    path = tmp_path / "data" / "magicmix.sqlite3"
    old = make_database(path, user_version=user_version)
    key = add_key(old, SECRET, s3="encrypted-s3-blob")
    key_id = old.execute("SELECT key_id FROM api_keys").fetchone()[0]
    now = time.time()
    rows = {}
    if user_version == 2:
        rows["queued"] = add_job(old, key_id, params(seed=1), status="queued", created_at=now)
        rows["twin"] = add_job(old, key_id, params(seed=2), status="queued", created_at=now)
        rows["running"] = add_job(
            old, key_id, params(seed=3), status="processing", created_at=now, claimant="local:9"
        )
        result = JobResult(output=["u"], generation_time=1, stored_in="user", object_names=["o"])
        rows["done"] = add_job(
            old,
            key_id,
            params(seed=4, webhook="http://127.0.0.1:9/hook"),
            status="success",
            created_at=now,
            result=result,
            webhook=WebhookState(),
        )
        old.execute(
            "INSERT INTO idempotency (key_id, idem_hash, fingerprint, job_id, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (key_id, Idempotency("pay-once", "fp").key_hash, "fp", rows["done"], now),
        )
    old.close()

    database = open_database(f"sqlite:///{path}")
    assert current_revision(database) == head()
    adopted = inspect(database.engine)  # the columns and indexes of a new database (SQLite
    for table in metadata.sorted_tables:  # spells their types REAL or FLOAT alike)
        assert {c["name"] for c in adopted.get_columns(table.name)} == set(table.c.keys())
        assert {i["name"] for i in adopted.get_indexes(table.name)} >= {
            i.name for i in table.indexes
        }
    keys = SqlKeyStore(database, SecretBox(SECRET), SECRET, [])
    assert keys.authenticate(key).key_id == key_id and keys.get_s3(key_id) == "encrypted-s3-blob"
    if user_version < 2:
        return
    jobs = SqlJobStore(database)
    lifecycle = Lifecycle(jobs, QueueLimits(100, 100))
    assert [job.id for job in lifecycle.claim_next(4, "new")] == [rows["queued"], rows["twin"]]
    requeued, failed = lifecycle.release_lapsed()  # the old process's running job
    assert [job.id for job in requeued] == [rows["running"]] and failed == []
    assert jobs.image(rows["running"]) == b"layout"
    due = jobs.lease_webhooks(now=now, lease_until=now + 60, limit=10)
    assert [job.id for job in due] == [rows["done"]]
    done = jobs.get(rows["done"])
    assert done is not None and done.status is JobStatus.SUCCESS and done.result == result
    claim = lifecycle.begin_idempotent(key_id, Idempotency("pay-once", "fp"))
    assert not claim.owned and claim.job_id == rows["done"]


def _open(url: str, results: object) -> None:
    database = open_database(url)
    results.put(current_revision(database))  # type: ignore[attr-defined]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_processes_starting_together_migrate_a_new_database_once(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database_url = (  # a new database, not yet migrated
        f"sqlite:///{tmp_path / 'magicmix.sqlite3'}"
        if dialect == "sqlite"
        else request.getfixturevalue("postgres").create_database()
    )
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_open, args=(database_url, results)) for _ in range(4)]
    for process in processes:
        process.start()
    revisions = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert revisions == [head()] * 4
    tables = inspect(open_database(database_url, migrate_schema=False).engine).get_table_names()
    assert sorted(tables) == ["alembic_version", "api_keys", "idempotency", "jobs"]


def test_the_tables_the_queries_use_are_the_tables_the_migrations_make(database_url: str) -> None:
    database = open_database(database_url)
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []
