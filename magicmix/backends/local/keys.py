"""The local key store: keys made by `magicmix keys create`, in SQLite, plus the static keys."""

from __future__ import annotations

import sqlite3
import time

from magicmix.backends.local.db import Database
from magicmix.crypto import SecretBox
from magicmix.errors import Unauthorized
from magicmix.keys import (
    KeyInfo,
    NewKey,
    Principal,
    StaticKeys,
    key_hash,
    mint_key,
)


class SqliteKeyStore:
    """Keys made by `magicmix keys create`, plus the operator's static keys."""

    def __init__(self, db: Database, box: SecretBox, secret: bytes, static_keys: list[str]):
        self._db = db
        self._box = box
        self._secret = secret
        self._static = StaticKeys(static_keys, secret)

    def create(self, *, admin: bool = False) -> NewKey:
        new = mint_key(admin=admin)
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO api_keys (key_id, key_hash, admin, webhook_secret, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    new.key_id,
                    key_hash(self._secret, new.key),
                    int(admin),
                    self._box.encrypt(new.webhook_secret),
                    new.created_at,
                ),
            )
        return new

    def list(self) -> list[KeyInfo]:
        rows = (
            self._db.connection()
            .execute(
                "SELECT key_id, admin, created_at, revoked_at FROM api_keys"
                " WHERE key_hash NOT LIKE 'static:%' ORDER BY created_at, key_id"
            )
            .fetchall()
        )
        made = [
            KeyInfo(r["key_id"], bool(r["admin"]), r["created_at"], r["revoked_at"]) for r in rows
        ]
        return self._static.infos() + made

    def revoke(self, key_id: str) -> bool:
        """Refuse the key from now on; its jobs and S3 details stay (its webhooks still go)."""
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL"
                " AND key_hash NOT LIKE 'static:%'",
                (time.time(), key_id),
            )
        return cursor.rowcount > 0

    def authenticate(self, key: str) -> Principal:
        principal = self._static.find(key)
        if principal is not None:
            return principal
        digest = key_hash(self._secret, key)
        row = (
            self._db.connection()
            .execute(
                "SELECT key_id, admin, webhook_secret FROM api_keys"
                " WHERE key_hash = ? AND revoked_at IS NULL",
                (digest,),
            )
            .fetchone()
        )
        if row is None:
            raise Unauthorized("invalid API key")
        return Principal(
            key_id=row["key_id"],
            admin=bool(row["admin"]),
            webhook_secret=self._box.decrypt(row["webhook_secret"]),
        )

    def webhook_secret(self, key_id: str) -> str:
        principal = self._static.by_id(key_id)
        if principal is not None:
            return principal.webhook_secret
        row = (
            self._db.connection()
            .execute("SELECT webhook_secret FROM api_keys WHERE key_id = ?", (key_id,))
            .fetchone()
        )
        if row is None:
            raise Unauthorized("the key of this job no longer exists")
        return self._box.decrypt(row["webhook_secret"])

    def get_s3(self, key_id: str) -> str | None:
        row = (
            self._db.connection()
            .execute("SELECT s3_details FROM api_keys WHERE key_id = ?", (key_id,))
            .fetchone()
        )
        return row["s3_details"] if row else None

    def set_s3(self, key_id: str, blob: str) -> None:
        with self._db.transaction() as connection:
            self._ensure_row(connection, key_id)
            connection.execute(
                "UPDATE api_keys SET s3_details = ? WHERE key_id = ?", (blob, key_id)
            )

    def delete_s3(self, key_id: str) -> bool:
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "UPDATE api_keys SET s3_details = NULL WHERE key_id = ? AND s3_details IS NOT NULL",
                (key_id,),
            )
        return cursor.rowcount > 0

    def _ensure_row(self, connection: sqlite3.Connection, key_id: str) -> None:
        """Static keys get a row on first `update_s3`, to hold their S3 details."""
        principal = self._static.by_id(key_id)
        if principal is None:
            return
        connection.execute(
            "INSERT OR IGNORE INTO api_keys (key_id, key_hash, admin, webhook_secret, created_at)"
            " VALUES (?, ?, 1, ?, ?)",
            (key_id, "static:" + key_id, self._box.encrypt(principal.webhook_secret), time.time()),
        )
