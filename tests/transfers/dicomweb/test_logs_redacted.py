"""QIDO-RS puts patient names and IDs in the query string, by the standard
(`/dicom-web/studies?PatientName=DOE*`): no log line may carry them, neither the dev server's,
Django's warnings, nor any field of gunicorn's access log."""

from __future__ import annotations

import datetime
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from django.test import Client

from relay.logs import RedactingGunicornLogger, redact

QUERY = "PatientName=DOE%5EJANE*&00100020=PID-4711&StudyDate=20240101-"
PHI = ("DOE", "JANE", "PID-4711")


def _clean(line: str) -> None:
    for value in PHI:
        assert value not in line, line


def test_a_qido_url_is_redacted() -> None:
    _clean(redact(f'"GET /dicom-web/studies?{QUERY} HTTP/1.1" 200'))
    _clean(redact(f"/dicom-web/studies/1.2.3/series?{QUERY}"))


def test_every_gunicorn_field_of_a_qido_request_is_redacted() -> None:
    cfg = SimpleNamespace(
        errorlog="-", loglevel="info", accesslog=None, syslog=False, capture_output=False,
        logconfig=None, logconfig_dict={}, logconfig_json=None, disable_redirect_access_to_syslog=False,
        access_log_format='%(h)s "%(r)s" %(s)s "%(f)s" %(U)s %(q)s', user=None, group=None,
        syslog_addr=None, syslog_prefix=None, syslog_facility="user", dogstatsd_tags="",
        statsd_host=None, statsd_prefix="",
    )  # fmt: skip
    logger = RedactingGunicornLogger(cfg)
    uri = f"/dicom-web/studies?{QUERY}"
    req = SimpleNamespace(method="GET", uri=uri, path="/dicom-web/studies", query=QUERY,
                          version=(1, 1), headers=[])  # fmt: skip
    resp = SimpleNamespace(status="200 OK", response_length=10, sent=10, headers=[])
    environ = {
        "REMOTE_ADDR": "127.0.0.1",
        "RAW_URI": uri,
        "HTTP_REFERER": f"https://relay.example.org/ohif/viewer?{QUERY}",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/dicom-web/studies",
        "QUERY_STRING": QUERY,
    }
    atoms = logger.atoms(resp, req, environ, datetime.timedelta(seconds=0.01))
    line = cfg.access_log_format % atoms
    _clean(line)
    for value in atoms.values():
        if isinstance(value, str):
            _clean(value)


@pytest.mark.django_db
def test_djangos_warning_for_a_refused_search_carries_no_name(caplog: Any) -> None:
    root_handler = logging.getLogger().handlers[0]
    with caplog.at_level(logging.WARNING, logger="django.request"):
        assert Client().get(f"/dicom-web/studies?{QUERY}").status_code == 401
    for record in caplog.records:
        if all(f.filter(record) for f in root_handler.filters):  # type: ignore[union-attr]
            _clean(root_handler.format(record))
