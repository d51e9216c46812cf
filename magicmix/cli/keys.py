"""What `magicmix keys create|list|revoke` prints: the CLI's formatting of the key store.

Here, not in `magicmix.keys`, so the store knows nothing of how a terminal shows it; the
Modal app's `manage_keys` hands `key_action` to `backends.modal.compose.manage_keys`, so
`modal run modal_app.py::keys` prints the same lines.
"""

from __future__ import annotations

from datetime import UTC, datetime

from magicmix.errors import InvalidInput, NotFound
from magicmix.keys import KeyInfo
from magicmix.store.base import KeyStore


def describe_key(info: KeyInfo) -> str:
    """One line of `keys list`: id, role, when made, and when revoked."""
    made = "from MAGICMIX_API_KEYS" if info.static else _when(info.created_at)
    revoked = f"  revoked {_when(info.revoked_at)}" if info.revoked_at else ""
    return f"{info.key_id}  {'admin' if info.admin else 'user '}  {made}{revoked}"


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp or 0, UTC).strftime("%Y-%m-%d %H:%M UTC")


def key_action(keys: KeyStore, action: str, *, key_id: str = "", admin: bool = False) -> str:
    """What `magicmix keys create|list|revoke` prints, on any key store.

    `create` prints the key alone on the first line (scripts take it from there).
    """
    if action == "create":
        new = keys.create(admin=admin)
        role = "admin" if new.admin else "user"
        return "\n".join(
            [
                new.key,
                f"key id: {new.key_id} ({role})",
                f"webhook signing secret: {new.webhook_secret}",
            ]
        )
    if action == "list":
        return "\n".join(describe_key(info) for info in keys.list()) or "no keys"
    if action == "revoke":
        if not keys.revoke(key_id):
            raise NotFound(
                f"no active key {key_id!r} (static keys are removed from MAGICMIX_API_KEYS)"
            )
        return f"revoked {key_id}"
    raise InvalidInput(f"unknown action {action!r}: create, list or revoke", field="action")
