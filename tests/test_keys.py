"""API keys: hashed at rest, admin flag, per-key webhook secrets, static operator keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from magicmix.crypto import SecretBox
from magicmix.db import Database
from magicmix.errors import Unauthorized
from magicmix.keys import SqliteKeyStore

SECRET = b"unit-test-service-secret"


@pytest.fixture
def keys(tmp_path: Path) -> SqliteKeyStore:
    return SqliteKeyStore(
        Database(tmp_path / "k.sqlite3"), SecretBox(SECRET), SECRET, ["operator-key"]
    )


def test_created_key_authenticates_and_is_stored_hashed(
    keys: SqliteKeyStore, tmp_path: Path
) -> None:
    new = keys.create()
    principal = keys.authenticate(new.key)
    assert principal.key_id == new.key_id and not principal.admin
    assert principal.webhook_secret == new.webhook_secret.strip()
    assert new.webhook_secret.startswith("whsec_")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("k.sqlite3*"))
    assert new.key.encode() not in raw
    assert new.webhook_secret.encode() not in raw


def test_unknown_and_near_miss_keys_are_refused(keys: SqliteKeyStore) -> None:
    new = keys.create()
    for bad in ("", "nope", new.key[:-1], new.key + "x", new.key.upper()):
        with pytest.raises(Unauthorized):
            keys.authenticate(bad)


def test_admin_keys_and_static_keys(keys: SqliteKeyStore) -> None:
    assert keys.authenticate(keys.create(admin=True).key).admin
    operator = keys.authenticate("operator-key")
    assert operator.admin and operator.key_id.startswith("env-")
    assert keys.webhook_secret(operator.key_id) == operator.webhook_secret


def test_each_key_has_its_own_webhook_secret(keys: SqliteKeyStore) -> None:
    a, b = keys.create(), keys.create()
    assert a.webhook_secret != b.webhook_secret
    assert keys.webhook_secret(a.key_id) == a.webhook_secret


def test_static_key_secrets_are_stable_across_restarts(tmp_path: Path) -> None:
    first = SqliteKeyStore(Database(tmp_path / "a.sqlite3"), SecretBox(SECRET), SECRET, ["k"])
    second = SqliteKeyStore(Database(tmp_path / "b.sqlite3"), SecretBox(SECRET), SECRET, ["k"])
    assert first.authenticate("k") == second.authenticate("k")


def test_s3_details_are_kept_per_key_and_removable(keys: SqliteKeyStore) -> None:
    a, b = keys.create(), keys.create()
    keys.set_s3(a.key_id, "blob-a")
    assert keys.get_s3(a.key_id) == "blob-a" and keys.get_s3(b.key_id) is None
    assert keys.delete_s3(a.key_id) and not keys.delete_s3(a.key_id)
    assert keys.get_s3(a.key_id) is None


def test_static_keys_can_hold_s3_details(keys: SqliteKeyStore) -> None:
    operator = keys.authenticate("operator-key")
    keys.set_s3(operator.key_id, "blob")
    assert keys.get_s3(operator.key_id) == "blob"
    assert keys.authenticate("operator-key") == operator
