"""RELAY_LOG_FORMAT=json: every log line is one JSON object (UTC time, level, logger, message, the
request's id), in Django's processes and in gunicorn's own lines, still redacted."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from relay.logs import REQUEST_ID, JsonFormatter, RedactingFilter
from tests.server_process import database_url_of_this_run, relay_server

ROOT = Path(__file__).resolve().parent.parent.parent
TOKEN = "Zq3v-SECRETTOKEN-0123456789abcdef"
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _line(record: logging.LogRecord) -> dict[str, Any]:
    assert RedactingFilter().filter(record)
    text = JsonFormatter().format(record)
    assert "\n" not in text
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_a_line_is_one_redacted_json_object() -> None:
    record = logging.LogRecord(
        "django.request", logging.WARNING, __file__, 1, "Not Found: %s\nsecond line",
        (f"/p/{TOKEN}/?q=DOE%5EJANE",), None,
    )  # fmt: skip
    line = _line(record)
    assert set(line) == {"time", "level", "logger", "message"}
    assert UTC_TIME.fullmatch(line["time"])
    assert (line["level"], line["logger"]) == ("WARNING", "django.request")
    assert line["message"] == "Not Found: /p/[redacted]/?[redacted]\nsecond line"


def test_it_carries_the_request_id_and_the_traceback() -> None:
    try:
        raise ValueError(f"while reading /p/{TOKEN}/")
    except ValueError:
        failed = logging.LogRecord(
            "relay", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = _line(failed)
    assert "request_id" not in line  # outside a request
    assert "ValueError" in line["exc_info"] and TOKEN not in line["exc_info"]
    given = REQUEST_ID.set("abc123def456")
    try:
        hello = logging.LogRecord("relay", logging.INFO, __file__, 1, "hello", (), None)
        assert _line(hello)["request_id"] == "abc123def456"
    finally:
        REQUEST_ID.reset(given)


@pytest.mark.django_db
def test_each_request_gets_an_id_sent_back_and_a_proxys_is_kept_when_it_looks_like_one() -> None:
    first = Client().get("/accounts/login/")["X-Request-ID"]
    second = Client().get("/accounts/login/")["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second
    kept = Client(HTTP_X_REQUEST_ID="nginx-7f3a9c01").get("/accounts/login/")
    assert kept["X-Request-ID"] == "nginx-7f3a9c01"
    odd = Client(HTTP_X_REQUEST_ID="<script>DOE^JANE</script>").get("/accounts/login/")
    assert re.fullmatch(r"[0-9a-f]{32}", odd["X-Request-ID"])


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "RELAY_VAR_DIR": str(tmp_path / "var"), "RELAY_LOG_FORMAT": "xml"}
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "relay.settings"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "RELAY_LOG_FORMAT must be plain or json" in done.stderr


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_gunicorn_and_django_write_json_lines_with_no_phi(tmp_path: Path) -> None:
    env = {"RELAY_LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
    with relay_server(
        tmp_path,
        database_url=database_url_of_this_run(),
        env=env,
        args=("--access-logfile", "-", "--log-level", "info"),
    ) as server:
        missing = server.request("GET", f"/p/{TOKEN}/?q=DOE%5EJANE&patient=MRN-4711")
        assert missing.status == 404
        request_id = missing.headers["X-Request-ID"]
        search = server.request(
            "GET",
            "/dicom-web/studies?PatientName=DOE%5EJANE",
            headers={"X-Request-ID": "lb-0001-abcd"},
        )
        assert search.status in (401, 403)
    lines = [line for line in server.log.read_text().splitlines() if line.strip()]
    assert lines
    parsed = []
    for line in lines:
        entry = json.loads(line)  # every line: gunicorn's start-up and access lines too
        assert UTC_TIME.fullmatch(entry["time"]), line
        assert {"level", "logger", "message"} <= set(entry)
        parsed.append(entry)
    text = "\n".join(lines)
    for secret in (TOKEN, "DOE", "JANE", "MRN-4711"):
        assert secret not in text
    loggers = {entry["logger"] for entry in parsed}
    assert {"gunicorn.error", "gunicorn.access"} <= loggers
    # Django's own line about the request ("Not Found: ...") carries its id; the proxy's is kept.
    not_found = [entry for entry in parsed if entry["message"].startswith("Not Found")]
    assert [entry.get("request_id") for entry in not_found] == [request_id]
    refused = [entry for entry in parsed if entry["message"].startswith("Unauthorized")]
    assert [entry.get("request_id") for entry in refused] == ["lb-0001-abcd"]
