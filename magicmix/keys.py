"""API keys: stored as keyed hashes, each with its own webhook signing secret.

A key is a random 32-byte token, so one HMAC-SHA256 under the service secret is a sound
way to store it (no slow hash needed); lookups are by hash, and the static keys from
`MAGICMIX_API_KEYS` are compared in constant time. Webhook secrets must be usable, so
they are stored encrypted, not hashed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Protocol

from magicmix.crypto import SecretBox
from magicmix.db import Database
from magicmix.errors import Unauthorized
from magicmix.webhooks import new_signing_secret

KEY_PREFIX = "mm_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's public id (safe to log), admin flag, webhook secret."""

    key_id: str
    admin: bool
    webhook_secret: str


@dataclass(frozen=True)
class NewKey:
    key: str
    key_id: str
    webhook_secret: str
    admin: bool


class KeyStore(Protocol):
    """Authenticates keys and keeps each key's encrypted S3 details."""

    def authenticate(self, key: str) -> Principal: ...
    def webhook_secret(self, key_id: str) -> str: ...
    def get_s3(self, key_id: str) -> str | None: ...
    def set_s3(self, key_id: str, blob: str) -> None: ...
    def delete_s3(self, key_id: str) -> bool: ...


def _hash(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def static_principals(keys: list[str], secret: bytes) -> dict[str, Principal]:
    """Operator keys from the environment: admin, with secrets derived from the service secret.

    Returned by hash, so a lookup never compares the key itself.
    """
    principals = {}
    for key in keys:
        digest = _hash(secret, key)
        webhook_key = hmac.new(secret, b"webhook:" + key.encode(), hashlib.sha256).digest()
        principals[digest] = Principal(
            key_id="env-" + digest[:12],
            admin=True,
            webhook_secret="whsec_" + base64.b64encode(webhook_key[:24]).decode(),
        )
    return principals


class StaticKeys:
    """The operator's keys (`MAGICMIX_API_KEYS`), found by keyed hash in constant time."""

    def __init__(self, keys: list[str], secret: bytes) -> None:
        self._secret = secret
        self._by_hash = static_principals(keys, secret)

    def find(self, key: str) -> Principal | None:
        digest = _hash(self._secret, key)
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None

    def by_id(self, key_id: str) -> Principal | None:
        return next((p for p in self._by_hash.values() if p.key_id == key_id), None)


class SqliteKeyStore:
    """Keys made by `magicmix keys create`, plus the operator's static keys."""

    def __init__(self, db: Database, box: SecretBox, secret: bytes, static_keys: list[str]):
        self._db = db
        self._box = box
        self._secret = secret
        self._static = StaticKeys(static_keys, secret)

    def create(self, *, admin: bool = False) -> NewKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key-" + secrets.token_hex(6)
        webhook_secret = new_signing_secret()
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO api_keys (key_id, key_hash, admin, webhook_secret, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    key_id,
                    _hash(self._secret, key),
                    int(admin),
                    self._box.encrypt(webhook_secret),
                    time.time(),
                ),
            )
        return NewKey(key=key, key_id=key_id, webhook_secret=webhook_secret, admin=admin)

    def authenticate(self, key: str) -> Principal:
        principal = self._static.find(key)
        if principal is not None:
            return principal
        digest = _hash(self._secret, key)
        row = (
            self._db.connection()
            .execute(
                "SELECT key_id, admin, webhook_secret FROM api_keys WHERE key_hash = ?", (digest,)
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
