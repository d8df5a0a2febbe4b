"""Production without an SMTP server does not write its e-mail to files on the server.

Found by the operator run of issue 18 on main: without EMAIL_HOST, a production start (https://
SITE_URL, DEBUG off) wrote every share notice and password reset to var/mail, and `manage.py
check --deploy` passed. Now `check --deploy` fails (relay.E001) and a message is refused with
an error that says what to set; the embedded default (http://) still writes files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.server_process import ROOT

SEND = r"""
import django

django.setup()
from django.core.mail import send_mail

try:
    send_mail("Relay: a study was shared with you", "Open Relay to see it.", None, ["dr@example.org"])
except Exception as exc:
    print(f"REFUSED {type(exc).__name__}: {exc}")
else:
    print("SENT")
"""


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {
        **os.environ,
        "RELAY_VAR_DIR": str(tmp_path / "var"),
        "DEBUG": "0",
        "SECRET_KEY": "test-" + "x" * 60,
        "DJANGO_SETTINGS_MODULE": "relay.settings",
        **values,
    }
    for name in ("EMAIL_HOST", "EMAIL_BACKEND", "EMAIL_FILE_PATH", "DATABASE_URL", "REDIS_URL"):
        if name not in values:
            env.pop(name, None)
    return env


def _python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def test_production_without_smtp_refuses_mail_and_fails_the_deploy_check(tmp_path: Path) -> None:
    env = _env(tmp_path, SITE_URL="https://relay.example.org", ALLOWED_HOSTS="relay.example.org")
    check = _python(["manage.py", "check", "--deploy"], env)
    assert check.returncode != 0
    assert "relay.E001" in check.stderr and "EMAIL_HOST" in check.stderr

    sent = _python(["-c", SEND], env)
    assert "REFUSED MailNotConfigured" in sent.stdout and "EMAIL_HOST" in sent.stdout, sent
    mail = tmp_path / "var" / "mail"
    assert not mail.exists() or not any(mail.iterdir())

    # With the SMTP server named, the deploy check has nothing to say about e-mail.
    configured = _env(
        tmp_path,
        SITE_URL="https://relay.example.org",
        ALLOWED_HOSTS="relay.example.org",
        EMAIL_HOST="smtp.relay.example.org",
    )
    assert "relay.E001" not in _python(["manage.py", "check", "--deploy"], configured).stderr


def test_the_embedded_default_still_writes_files(tmp_path: Path) -> None:
    sent = _python(["-c", SEND], _env(tmp_path))  # http://127.0.0.1:8000
    assert sent.stdout.strip() == "SENT", sent
    assert len(list((tmp_path / "var" / "mail").iterdir())) == 1
