"""API keys in the SQL store: the same tests on SQLite and PostgreSQL.

Hashed at rest, admin flag, per-key webhook secrets, static operator keys, listing and
revocation, S3 details.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from magicmix.crypto import SecretBox
from magicmix.errors import Unauthorized
from magicmix.store.base import KeyStore
from magicmix.store.database import open_database
from magicmix.store.keys import SqlKeyStore
from magicmix.store.schema import api_keys
from magicmix.store.testing import TempPostgres

SECRET = b"unit-test-service-secret"
OPERATOR = "operator-key"


def key_store(url: str) -> SqlKeyStore:
    return SqlKeyStore(open_database(url), SecretBox(SECRET), SECRET, [OPERATOR])


@pytest.fixture
def keys(database_url: str) -> SqlKeyStore:
    return key_store(database_url)


def stored_bytes(keys: SqlKeyStore, tmp_path: Path) -> bytes:
    """Everything the store keeps at rest: every row, and SQLite's files."""
    with keys._db.read() as connection:
        rows = connection.execute(select(api_keys)).all()
    files = b"".join(p.read_bytes() for p in tmp_path.glob("magicmix.sqlite3*"))
    return repr(rows).encode() + files


def test_created_key_authenticates_and_is_stored_hashed(keys: SqlKeyStore, tmp_path: Path) -> None:
    new = keys.create()
    principal = keys.authenticate(new.key)
    assert principal.key_id == new.key_id and not principal.admin
    assert principal.webhook_secret == new.webhook_secret
    assert new.webhook_secret.startswith("whsec_") and new.key.startswith("mm_")
    raw = stored_bytes(keys, tmp_path)
    assert raw and new.key.encode() not in raw
    assert new.webhook_secret.encode() not in raw


def test_unknown_and_near_miss_keys_are_refused(keys: KeyStore) -> None:
    new = keys.create()
    for bad in ("", "nope", new.key[:-1], new.key + "x", new.key.upper()):
        with pytest.raises(Unauthorized):
            keys.authenticate(bad)


def test_admin_keys_and_static_keys(keys: KeyStore) -> None:
    assert keys.authenticate(keys.create(admin=True).key).admin
    assert not keys.authenticate(keys.create().key).admin
    operator = keys.authenticate(OPERATOR)
    assert operator.admin and operator.key_id.startswith("env-")
    assert keys.webhook_secret(operator.key_id) == operator.webhook_secret
    with pytest.raises(Unauthorized):
        keys.webhook_secret("key-unknown")


def test_each_key_has_its_own_webhook_secret(keys: KeyStore) -> None:
    a, b = keys.create(), keys.create()
    assert a.webhook_secret != b.webhook_secret
    assert keys.webhook_secret(a.key_id) == a.webhook_secret


def test_static_key_secrets_are_the_same_on_every_store(
    tmp_path: Path, postgres: TempPostgres
) -> None:
    """Two containers (or a restart) derive the same principal for an operator key."""
    first = key_store(f"sqlite:///{tmp_path / 'a.sqlite3'}")
    second = key_store(postgres.fresh_url())
    assert first.authenticate(OPERATOR) == second.authenticate(OPERATOR)


def test_list_shows_ids_and_roles_never_keys(keys: KeyStore) -> None:
    user, admin = keys.create(), keys.create(admin=True)
    listed = {info.key_id: info for info in keys.list()}
    assert listed[user.key_id].admin is False and listed[admin.key_id].admin is True
    assert listed[user.key_id].created_at == pytest.approx(user.created_at)
    static = [info for info in listed.values() if info.static]
    assert [info.key_id for info in static] == [keys.authenticate(OPERATOR).key_id]
    assert user.key not in repr(keys.list()) and user.webhook_secret not in repr(keys.list())


def test_revoked_keys_are_refused_and_listed_as_revoked(keys: KeyStore) -> None:
    new, other = keys.create(), keys.create()
    assert keys.revoke(new.key_id) is True
    with pytest.raises(Unauthorized):
        keys.authenticate(new.key)
    assert keys.authenticate(other.key).key_id == other.key_id
    assert keys.revoke(new.key_id) is False  # once
    assert keys.revoke("key-unknown") is False
    assert keys.revoke(keys.authenticate(OPERATOR).key_id) is False  # static: edit the setting
    revoked = {info.key_id: info.revoked_at for info in keys.list()}
    assert revoked[new.key_id] is not None and revoked[other.key_id] is None
    # a revoked key's jobs still get their webhooks, signed with its secret
    assert keys.webhook_secret(new.key_id) == new.webhook_secret


def test_s3_details_are_kept_per_key_and_removable(keys: KeyStore) -> None:
    a, b = keys.create(), keys.create()
    keys.set_s3(a.key_id, "blob-a")
    assert keys.get_s3(a.key_id) == "blob-a" and keys.get_s3(b.key_id) is None
    assert keys.delete_s3(a.key_id) and not keys.delete_s3(a.key_id)
    assert keys.get_s3(a.key_id) is None


def test_static_keys_can_hold_s3_details(keys: KeyStore) -> None:
    operator = keys.authenticate(OPERATOR)
    keys.set_s3(operator.key_id, "blob")
    assert keys.get_s3(operator.key_id) == "blob"
    assert keys.authenticate(OPERATOR) == operator
