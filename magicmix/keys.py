"""API keys: who is calling, and how keys are stored (as keyed hashes).

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
import time
from dataclasses import dataclass

KEY_PREFIX = "mm_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's public id (safe to log), admin flag, webhook secret."""

    key_id: str
    admin: bool
    webhook_secret: str


@dataclass(frozen=True)
class NewKey:
    """A key just made: the only time the key itself is known to the service."""

    key: str
    key_id: str
    webhook_secret: str
    admin: bool
    created_at: float


@dataclass(frozen=True)
class KeyInfo:
    """What `keys list` shows of a key: never the key, never its secrets."""

    key_id: str
    admin: bool
    created_at: float
    revoked_at: float | None = None
    static: bool = False  # from MAGICMIX_API_KEYS: revoked by editing that setting


def new_signing_secret() -> str:
    """A fresh per-key webhook signing secret in Standard Webhooks' `whsec_<base64>` form."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()  # spec: 24-64 bytes


def mint_key(*, admin: bool) -> NewKey:
    """Fresh key material: a 32-byte token, a public id, the key's webhook signing secret."""
    return NewKey(
        key=KEY_PREFIX + secrets.token_urlsafe(32),
        key_id="key-" + secrets.token_hex(6),
        webhook_secret=new_signing_secret(),
        admin=admin,
        created_at=time.time(),
    )


def key_hash(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def static_principals(keys: list[str], secret: bytes) -> dict[str, Principal]:
    """Operator keys from the environment: admin, with secrets derived from the service secret.

    Returned by hash, so a lookup never compares the key itself.
    """
    principals = {}
    for key in keys:
        digest = key_hash(secret, key)
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
        digest = key_hash(self._secret, key)
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None

    def by_id(self, key_id: str) -> Principal | None:
        return next((p for p in self._by_hash.values() if p.key_id == key_id), None)

    def infos(self) -> list[KeyInfo]:
        return [
            KeyInfo(p.key_id, admin=True, created_at=0.0, static=True)
            for p in self._by_hash.values()
        ]
