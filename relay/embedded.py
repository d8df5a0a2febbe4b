"""Making the embedded default's folders and secret on first use.

`manage.py`, the WSGI entry point and Celery's worker and beat start-up call `var_prepare()`
before anything needs those files; importing settings never writes to disk.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .env import broker_dir, env_str, secret_key_file, var_dir


def broker_database() -> Path:
    """The embedded Celery broker's SQLite file (relay.broker), when REDIS_URL is unset."""
    return broker_dir().resolve() / "broker.sqlite3"


def var_prepare() -> None:
    """Make var/, its static and broker folders, and a secret key when none is set.

    Idempotent and cheap; the secret is written once, readable by its owner only, and never
    replaced (sessions and signed links survive restarts).
    """
    var = var_dir()
    var.mkdir(parents=True, exist_ok=True)
    # whitenoise warns about a STATIC_ROOT that is missing.
    (var / "static").mkdir(exist_ok=True)
    if not env_str("REDIS_URL"):
        broker = broker_dir()
        broker.mkdir(parents=True, exist_ok=True)
        if (broker / "queue").is_dir():
            # Messages the file broker of earlier versions left behind go to the SQLite broker.
            from .broker import file_queue_drain

            file_queue_drain(broker, broker_database())
    if not env_str("SECRET_KEY"):
        key_file = secret_key_file()
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(50))
