"""Reading the environment: the typed helpers settings are written with, and where the embedded
parts keep their files. Nothing here writes to disk, so settings can import it freely."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def var_dir() -> Path:
    """Where the embedded parts keep their files (database, images, broker, mail, secret)."""
    return Path(env_str("RELAY_VAR_DIR", str(BASE_DIR / "var")))


def broker_dir() -> Path:
    """The folder of the embedded Celery broker (used when REDIS_URL is unset)."""
    return Path(env_str("RELAY_BROKER_DIR", str(var_dir() / "broker")))


def secret_key_file() -> Path:
    return var_dir() / "secret_key"


def embedded_secret_key() -> str:
    """The secret `make run` keeps under var/, read if it is there.

    A process started before it exists (the test suite, `manage.py check` in a fresh checkout)
    gets a random key of its own that dies with it: reading settings never writes a file.
    """
    try:
        return secret_key_file().read_text().strip()
    except FileNotFoundError:
        return secrets.token_urlsafe(50)
