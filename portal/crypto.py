"""Secrets Relay must read back (not only compare), encrypted at rest: authenticator-app secrets
and the tokens of guest links. Fernet, with a key derived from RELAY_MFA_KEY (or SECRET_KEY),
so a copy of the database alone gives neither."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet
from django.conf import settings


def _fernet() -> Fernet:
    key = getattr(settings, "RELAY_MFA_KEY", "") or settings.SECRET_KEY
    digest = hashlib.sha256(b"relay-mfa-secrets:" + key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def secret_encrypt(text: str) -> str:
    return _fernet().encrypt(text.encode()).decode()


def secret_decrypt(encrypted: str) -> str:
    return _fernet().decrypt(encrypted.encode()).decode()
