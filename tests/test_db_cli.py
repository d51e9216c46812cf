"""`magicmix db`: check a deployment's database, and move a laptop's SQLite into the
PostgreSQL that replicas or Modal will share, with every key and job kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from magicmix.config import Settings
from magicmix.jobs import QueueLimits
from magicmix.lifecycle import Lifecycle
from magicmix.store.stores import open_stores
from magicmix.store.testing import TempPostgres
from tests.conftest import run_cli
from tests.http_fixtures import free_port
from tests.test_jobs import params

SECRET = "the-laptop-secret-key"


def test_copy_moves_a_laptops_sqlite_into_postgresql_with_keys_and_ids_kept(
    tmp_path: Path, postgres: TempPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop = Settings(data_dir=tmp_path / "data", secret_key=SECRET)
    stores = open_stores(laptop)
    key = stores.keys.create(admin=True)
    lifecycle = Lifecycle(stores.jobs, QueueLimits(10, 10))
    made = [lifecycle.create(key.key_id, params(seed=i), b"layout").id for i in range(3)]
    target = postgres.create_database()  # empty: `db copy` migrates it
    env = {"MAGICMIX_DATA_DIR": str(laptop.data_dir), "MAGICMIX_SECRET_KEY": SECRET}
    copied = run_cli(monkeypatch, env, "db", "copy", "--to", target)
    assert copied.exit_code == 0, copied.output
    assert "1 api_keys" in copied.output and "3 jobs" in copied.output
    shared = open_stores(laptop.model_copy(update={"database_url": SecretStr(target)}))
    assert shared.keys.authenticate(key.key).key_id == key.key_id  # same secret, same key
    moved = Lifecycle(shared.jobs, QueueLimits(10, 10))
    assert [job.id for job in moved.claim_next(8, "replica")] == made
    assert moved.create(key.key_id, params(), b"x").id == made[-1] + 1  # ids go on
    again = run_cli(monkeypatch, env, "db", "copy", "--to", target)
    assert again.exit_code == 2 and "already has rows" in again.output
    checked = run_cli(monkeypatch, {**env, "MAGICMIX_DATABASE_URL": target}, "db", "check")
    assert checked.exit_code == 0, checked.output
    assert "postgresql database" in checked.output and "jobs: 4 rows" in checked.output


def test_an_unreachable_database_is_said_plainly_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://magicmix:hunter2@127.0.0.1:{free_port()}/magicmix"
    env = {"MAGICMIX_DATA_DIR": str(tmp_path), "MAGICMIX_DATABASE_URL": url}
    checked = run_cli(monkeypatch, env, "db", "check")
    assert checked.exit_code == 2
    assert "cannot use the database at postgresql://magicmix:***@127.0.0.1" in checked.output
    assert "hunter2" not in checked.output


def test_keys_for_a_shared_database_need_the_deployments_secret(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A laptop making keys for a deployment without its secret would make keys no
    container can check: refused, instead of a secret made up on the spot."""
    env = {"MAGICMIX_DATA_DIR": str(tmp_path), "MAGICMIX_DATABASE_URL": pg_url}
    made = run_cli(monkeypatch, env, "keys", "create")
    assert made.exit_code == 2 and "MAGICMIX_SECRET_KEY is not set" in made.output
    assert not (tmp_path / "secret.key").exists()
    made = run_cli(monkeypatch, {**env, "MAGICMIX_SECRET_KEY": SECRET}, "keys", "create")
    assert made.exit_code == 0 and made.output.startswith("mm_")


def test_without_postgresql_make_test_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make test` runs this check first: a missing server is an error with the fix, never
    a skipped half of the suite."""
    import magicmix.store.testing as testing

    monkeypatch.setattr(testing, "DEBIAN_ROOT", tmp_path)
    monkeypatch.setattr(testing.shutil, "which", lambda name: None)
    monkeypatch.delenv("MAGICMIX_PG_BINDIR", raising=False)
    assert testing.main() == 1
    said = capsys.readouterr().err
    assert "apt-get install -y postgresql" in said and "MAGICMIX_PG_BINDIR" in said
