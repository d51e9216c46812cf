"""Encryption at rest for small secrets (S3 credentials, webhook secrets).

Keyed by the service secret (`MAGICMIX_SECRET_KEY`).
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from magicmix import errors

# Changing the label changes every derived key: stored blobs would no longer decrypt.
_HKDF_INFO = b"magicmix secretbox v1 (fernet)"


class SecretBox:
    """Fernet with a key derived by HKDF-SHA256, so a service secret of any length works."""

    def __init__(self, secret_key: bytes) -> None:
        if not secret_key:
            raise ValueError("the service secret key is empty")
        derived = HKDF(algorithm=SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret_key)
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def encrypt(self, plaintext: str) -> str:
        """An authenticated, timestamped token (ASCII), safe to store in a text column."""
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The plaintext; a tampered token or a changed service secret is a StorageError."""
        try:
            return self._fernet.decrypt(token).decode()
        except (InvalidToken, ValueError) as err:
            raise errors.StorageError(
                "stored S3 details cannot be decrypted (was MAGICMIX_SECRET_KEY changed?); "
                "send update_s3 again"
            ) from err
