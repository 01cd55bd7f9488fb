"""Secrets at rest: partner secrets encrypted with ``SECRET_KEY``; operator tokens hashed.

Fernet (AES-128-CBC + HMAC) from ``cryptography`` with a key derived from ``SECRET_KEY``;
operator tokens are random and only their SHA-256 is stored, like a password reset token.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from cryptography.fernet import Fernet, InvalidToken


class WrongSecretKey(ValueError):
    """A partner secret this ``SECRET_KEY`` cannot open: the replica's key is not the store's."""


class SecretBox:
    def __init__(self, secret_key: str) -> None:
        key = hashlib.sha256(b"ce-gateway/partner-secrets/" + secret_key.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise WrongSecretKey("partner secret cannot be decrypted: wrong SECRET_KEY?") from exc


def new_app_key() -> str:
    return "ak_" + secrets.token_hex(12)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_operator_token() -> str:
    return "op_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
