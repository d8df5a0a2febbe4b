"""Settings are read, never written: importing them touches no disk; the embedded default's
folders and secret are made when a process starts (manage.py, WSGI, Celery), once."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from relay.embedded import var_prepare

ROOT = Path(__file__).resolve().parent.parent.parent


def _env(var: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "REDIS_URL")}
    return {**env, "RELAY_VAR_DIR": str(var), "DJANGO_SETTINGS_MODULE": "relay.settings"}


def test_importing_settings_writes_nothing(tmp_path: Path) -> None:
    var = tmp_path / "var"
    code = (
        "import django; django.setup(); from django.conf import settings; print(settings.VAR_DIR)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(var),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == str(var)
    assert not var.exists()
    assert list(tmp_path.iterdir()) == []


def test_manage_py_makes_the_folders_and_a_private_secret_once(tmp_path: Path) -> None:
    var = tmp_path / "var"

    def check() -> str:
        subprocess.run(
            [sys.executable, "manage.py", "check"],
            cwd=ROOT,
            env=_env(var),
            capture_output=True,
            check=True,
        )
        return (var / "secret_key").read_text()

    first = check()
    assert check() == first  # kept, not replaced: sessions survive restarts
    assert len(first) >= 50
    assert stat.S_IMODE((var / "secret_key").stat().st_mode) == 0o600
    for folder in ("static", "broker"):
        assert (var / folder).is_dir(), folder


def test_a_set_secret_key_is_never_written(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RELAY_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SECRET_KEY", "from-the-secret-store")
    var_prepare()
    assert not (tmp_path / "var" / "secret_key").exists()
