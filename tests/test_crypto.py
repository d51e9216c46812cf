"""SecretBox: round trips, any secret length, and clear errors instead of InvalidToken."""

from __future__ import annotations

import pytest

from magicmix import errors
from magicmix.crypto import SecretBox


@pytest.mark.parametrize("secret", [b"x", b"short secret", b"k" * 500])
def test_roundtrip_with_any_secret_length(secret: bytes) -> None:
    box = SecretBox(secret)
    token = box.encrypt("hunter2 ünïcode")
    assert "hunter2" not in token
    assert box.decrypt(token) == "hunter2 ünïcode"


def test_tokens_differ_each_time() -> None:
    box = SecretBox(b"secret")
    assert box.encrypt("same") != box.encrypt("same")


def test_another_secret_cannot_decrypt() -> None:
    token = SecretBox(b"old secret").encrypt("data")
    with pytest.raises(errors.StorageError, match="MAGICMIX_SECRET_KEY"):
        SecretBox(b"new secret").decrypt(token)


@pytest.mark.parametrize("token", ["", "not a token", "é", "gAAAAAB" + "A" * 80])
def test_garbage_is_a_clear_error(token: str) -> None:
    with pytest.raises(errors.StorageError, match="cannot be decrypted"):
        SecretBox(b"secret").decrypt(token)


def test_tampered_token_is_refused() -> None:
    box = SecretBox(b"secret")
    token = box.encrypt("data")
    tampered = token[:-5] + ("A" if token[-5] != "A" else "B") + token[-4:]
    with pytest.raises(errors.StorageError):
        box.decrypt(tampered)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        SecretBox(b"")
