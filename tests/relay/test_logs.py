"""No patient data or secrets in logs: the dev server's access log, Django's warnings and
gunicorn's access log redact link tokens and query strings; mail files are private."""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from relay.logs import RedactingGunicornLogger, redact

TOKEN = "Zq3v-SECRETTOKEN-0123456789abcdef"


def test_it_redacts_tokens_and_searches() -> None:
    assert redact(f'"GET /p/{TOKEN}/studies/ HTTP/1.1" 200') == (
        '"GET /p/[redacted]/studies/ HTTP/1.1" 200'
    )
    assert redact("GET /studies/?q=DOE%5EJANE&modality=CT") == "GET /studies/?[redacted]"
    assert TOKEN not in redact(f"/invitations/{TOKEN}/")
    assert TOKEN not in redact(f"/accounts/reset/MQ/{TOKEN}/")
    assert TOKEN not in redact(f"/accounts/password/reset/key/1-{TOKEN}/")
    assert TOKEN not in redact(f"/accounts/confirm-email/{TOKEN}/")
    # Single sign-on's return carries the provider's code and state in the query string.
    assert TOKEN not in redact(f"/accounts/oidc/krmc-idp/login/callback/?code={TOKEN}&state=x")
    assert redact("/studies/3f2c/view/") == "/studies/3f2c/view/"


@pytest.mark.django_db
def test_the_dev_server_and_django_warnings_log_no_token(caplog: Any) -> None:
    # What runserver's handler logs for a request, through the configured handler's filter.
    server = logging.getLogger("django.server")
    handler = next(h for h in server.handlers if h.filters)
    record = server.makeRecord(
        "django.server", logging.INFO, __file__, 1, '"%s" %s %s',
        (f"GET /p/{TOKEN}/ HTTP/1.1", "404", "10"), None,
    )  # fmt: skip
    assert all(f.filter(record) for f in handler.filters)
    assert TOKEN not in handler.format(record)
    # Django's "Not Found: <path>" warning for a guessed link goes through the root handler.
    root_handler = logging.getLogger().handlers[0]
    with caplog.at_level(logging.WARNING, logger="django.request"):
        assert Client().get(f"/p/{TOKEN}/").status_code == 404
    for record in caplog.records:
        if all(f.filter(record) for f in root_handler.filters):
            assert TOKEN not in root_handler.format(record)


def _gunicorn_config() -> SimpleNamespace:
    return SimpleNamespace(
        errorlog="-", loglevel="info", accesslog=None, syslog=False, capture_output=False,
        logconfig=None, logconfig_dict={}, logconfig_json=None, disable_redirect_access_to_syslog=False,
        access_log_format='%(h)s "%(r)s" %(s)s "%(f)s"', user=None, group=None,
        syslog_addr=None, syslog_prefix=None, syslog_facility="user", dogstatsd_tags="",
        statsd_host=None, statsd_prefix="",
    )  # fmt: skip


def test_gunicorns_access_log_is_redacted() -> None:
    cfg = _gunicorn_config()
    logger = RedactingGunicornLogger(cfg)
    req = SimpleNamespace(method="GET", uri=f"/p/{TOKEN}/?x=1", path=f"/p/{TOKEN}/",
                          query="x=1", version=(1, 1), headers=[])  # fmt: skip
    resp = SimpleNamespace(status="200 OK", response_length=10, sent=10, headers=[])
    environ = {
        "REMOTE_ADDR": "127.0.0.1",
        "RAW_URI": f"/p/{TOKEN}/?x=1",
        "HTTP_REFERER": f"https://relay.example.org/p/{TOKEN}/",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": "GET",
        "PATH_INFO": f"/p/{TOKEN}/",
        "QUERY_STRING": "x=1",
    }
    import datetime

    atoms = logger.atoms(resp, req, environ, datetime.timedelta(seconds=0.01))
    line = cfg.access_log_format % atoms
    assert TOKEN not in line and "/p/[redacted]/" in line


def test_mail_files_are_readable_by_their_owner_only(settings: Any, tmp_path: Path) -> None:
    settings.EMAIL_BACKEND = "portal.mail.PrivateFileEmailBackend"
    settings.EMAIL_FILE_PATH = str(tmp_path / "mail")
    mail.send_mail(
        "Reset", f"https://relay.example.org/accounts/reset/MQ/{TOKEN}/", None, ["a@b.c"]
    )
    (written,) = (tmp_path / "mail").iterdir()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "mail").stat().st_mode) == 0o700


def test_gunicorns_own_lines_and_access_times_are_in_utc(monkeypatch: Any) -> None:
    """gunicorn wrote its lines ("Booting worker", "WORKER TIMEOUT") and its access log's time
    in the process's local time, which Django sets to the portal's TIME_ZONE (Denver): -0700
    beside every other line's UTC (issue 18)."""
    monkeypatch.delenv("RELAY_LOG_FORMAT", raising=False)
    zone = os.environ.get("TZ")
    os.environ["TZ"] = "America/Denver"
    time.tzset()
    try:
        logger = RedactingGunicornLogger(_gunicorn_config())
        record = logging.makeLogRecord({"msg": "Booting worker with pid: 42", "levelname": "INFO"})
        # (gunicorn's error logger is the process-wide "gunicorn.error": earlier loggers of this
        # run may have left handlers on it; each of ours formats the same way.)
        lines = [handler.format(record) for handler in logger.error_log.handlers]
        assert len(set(lines)) == 1, lines
        line = lines[0]
        stamp = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d{3}Z INFO gunicorn ", line)
        assert stamp, line
        written = datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - written).total_seconds()) < 60
        assert re.fullmatch(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\]", logger.now())
    finally:
        if zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = zone
        time.tzset()
