"""`KeyStore` over SQLAlchemy Core: keys made by `magicmix keys create`, plus static keys.

Keys are stored as keyed hashes (`keys.key_hash`), webhook secrets and S3 details
encrypted with the service secret; the operator's `MAGICMIX_API_KEYS` are never stored
(a static key gets a row only to hold its S3 details).
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, select, update

from magicmix.crypto import SecretBox
from magicmix.errors import Unauthorized
from magicmix.keys import KeyInfo, NewKey, Principal, StaticKeys, key_hash, mint_key
from magicmix.store.database import Database
from magicmix.store.schema import api_keys

STATIC_HASH_PREFIX = "static:"  # the key_hash of a static key's row: never a real hash


class SqlKeyStore:
    """`store.base.KeyStore` on a `Database`."""

    def __init__(self, db: Database, box: SecretBox, secret: bytes, static_keys: list[str]):
        self._db = db
        self._box = box
        self._secret = secret
        self._static = StaticKeys(static_keys, secret)

    def create(self, *, admin: bool = False) -> NewKey:
        new = mint_key(admin=admin)
        with self._db.transaction() as connection:
            connection.execute(
                api_keys.insert().values(
                    key_id=new.key_id,
                    key_hash=key_hash(self._secret, new.key),
                    admin=int(admin),
                    webhook_secret=self._box.encrypt(new.webhook_secret),
                    created_at=new.created_at,
                )
            )
        return new

    def list(self) -> list[KeyInfo]:
        query = (
            select(
                api_keys.c.key_id, api_keys.c.admin, api_keys.c.created_at, api_keys.c.revoked_at
            )
            .where(api_keys.c.key_hash.not_like(STATIC_HASH_PREFIX + "%"))
            .order_by(api_keys.c.created_at, api_keys.c.key_id)
        )
        with self._db.read() as connection:
            rows = connection.execute(query).all()
        made = [
            KeyInfo(row.key_id, bool(row.admin), row.created_at, row.revoked_at) for row in rows
        ]
        return self._static.infos() + made

    def revoke(self, key_id: str) -> bool:
        """Refuse the key from now on; its jobs and S3 details stay (its webhooks still go)."""
        with self._db.transaction() as connection:
            done = connection.execute(
                update(api_keys)
                .where(
                    api_keys.c.key_id == key_id,
                    api_keys.c.revoked_at.is_(None),
                    api_keys.c.key_hash.not_like(STATIC_HASH_PREFIX + "%"),
                )
                .values(revoked_at=time.time())
            )
        return done.rowcount > 0

    def authenticate(self, key: str) -> Principal:
        principal = self._static.find(key)
        if principal is not None:
            return principal
        query = select(api_keys.c.key_id, api_keys.c.admin, api_keys.c.webhook_secret).where(
            api_keys.c.key_hash == key_hash(self._secret, key), api_keys.c.revoked_at.is_(None)
        )
        with self._db.read() as connection:
            row = connection.execute(query).first()
        if row is None:
            raise Unauthorized("invalid API key")
        return Principal(
            key_id=row.key_id,
            admin=bool(row.admin),
            webhook_secret=self._box.decrypt(row.webhook_secret),
        )

    def webhook_secret(self, key_id: str) -> str:
        principal = self._static.by_id(key_id)
        if principal is not None:
            return principal.webhook_secret
        with self._db.read() as connection:
            secret = connection.scalar(
                select(api_keys.c.webhook_secret).where(api_keys.c.key_id == key_id)
            )
        if secret is None:
            raise Unauthorized("the key of this job no longer exists")
        return self._box.decrypt(secret)

    def get_s3(self, key_id: str) -> str | None:
        with self._db.read() as connection:
            return connection.scalar(
                select(api_keys.c.s3_details).where(api_keys.c.key_id == key_id)
            )

    def set_s3(self, key_id: str, blob: str) -> None:
        with self._db.transaction() as connection:
            self._ensure_row(connection, key_id)
            connection.execute(
                update(api_keys).where(api_keys.c.key_id == key_id).values(s3_details=blob)
            )

    def delete_s3(self, key_id: str) -> bool:
        with self._db.transaction() as connection:
            done = connection.execute(
                update(api_keys)
                .where(api_keys.c.key_id == key_id, api_keys.c.s3_details.is_not(None))
                .values(s3_details=None)
            )
        return done.rowcount > 0

    def _ensure_row(self, connection: Connection, key_id: str) -> None:
        """Static keys get a row on first `update_s3`, to hold their S3 details."""
        principal = self._static.by_id(key_id)
        if principal is None:
            return
        connection.execute(
            self._db.insert(api_keys)
            .values(
                key_id=key_id,
                key_hash=STATIC_HASH_PREFIX + key_id,
                admin=1,
                webhook_secret=self._box.encrypt(principal.webhook_secret),
                created_at=time.time(),
            )
            .on_conflict_do_nothing(index_elements=[api_keys.c.key_id])
        )
