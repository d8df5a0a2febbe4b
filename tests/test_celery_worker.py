"""A real Celery worker process, on whatever broker and database this run is configured with
(Redis and PostgreSQL in CI, the SQLite broker and SQLite by default), does the work it is sent,
and sends its e-mail through a real SMTP server on loopback (aiosmtpd)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from django.conf import settings
from django.db import connection
from django.test import Client
from django.utils import timezone

from portal.services import invitation_create
from relay.celery import app
from tests.helpers import PASSWORD, client_for, read_testdata, upload
from transfers.models import NotifyStatus, Share, Study, StudyStatus
from transfers.tasks import studies_complete_quiet

ROOT = Path(__file__).resolve().parent.parent


class Inbox:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.worker_log: Path | None = None  # the worker's output (set by the fixture)

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:  # noqa: N802
        self.messages.append(BytesParser(policy=default_policy).parsebytes(envelope.content))
        return "250 Message accepted for delivery"


def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


@pytest.fixture(scope="module")
def _worker_process(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker
) -> Iterator[Inbox]:
    """One worker and one SMTP server for the module; each test brings its own data."""
    tmp_path = tmp_path_factory.mktemp("worker")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        smtp_port = probe.getsockname()[1]
    smtp = Controller(Inbox(), hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    broker = tmp_path / "broker"
    with django_db_blocker.unblock():
        database_url = _database_url()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(smtp_port),
        "EMAIL_USE_TLS": "0",
        "RELAY_BROKER_DIR": str(broker),
        "RELAY_STUDY_QUIET_SECONDS": "0",
        "RELAY_VAR_DIR": str(tmp_path / "var"),
        "SECRET_KEY": settings.SECRET_KEY,
    }
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    if not settings.REDIS_URL:
        # Point this process's producer at the worker's private broker (relay.broker).
        app.conf.broker_url = f"sqlite:///{broker.resolve() / 'broker.sqlite3'}"
        # Connections made earlier in this run point at the default broker: start afresh.
        app._pool = None
        app.amqp._producer_pool = None
    app.conf.task_always_eager = False
    log = tmp_path / "worker.log"
    smtp.handler.worker_log = log
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "relay",
            "worker",
            "-Q",
            "quick,slow,render",
            "--pool",
            "solo",
            "-l",
            "INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield smtp.handler
    finally:
        app.conf.task_always_eager = True
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        smtp.stop()
        print(log.read_text(errors="replace")[-4000:])


@pytest.fixture
def worker(_worker_process: Inbox, transactional_db: None) -> Iterator[Inbox]:
    app.conf.task_always_eager = False  # after conftest's autouse fixture made it eager
    _worker_process.messages.clear()
    yield _worker_process
    app.conf.task_always_eager = True


def _wait_for(check, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("the worker did not finish in time")


def test_the_worker_sends_an_invitation_email(worker: Inbox, alice) -> None:
    invitation_create(
        facility=alice.memberships.get().facility,
        email="new.reader@clinic.example",
        role="reader",
        invited_by=alice,
    )
    _wait_for(lambda: worker.messages)
    message = worker.messages[0]
    assert message["To"] == "new.reader@clinic.example"
    assert "/invitations/" in message.get_body(("plain",)).get_content()


def test_a_share_reaches_the_recipient_by_smtp_and_the_sender_sees_it_opened(
    worker: Inbox, bob, bob_token, charlie
) -> None:
    client = Client()
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    study = Study.objects.get()
    Study.objects.update(status=StudyStatus.COMPLETE)
    response = client_for(bob).post(
        "/share/",
        {
            "study": [str(study.uuid)],
            "kind": "facility",
            "recipient_facility": charlie.memberships.get().facility.pk,
            "expires_on": (timezone.localdate() + timedelta(days=7)).isoformat(),
            "can_view": "on",
        },
    )
    assert response.status_code == 302
    _wait_for(lambda: worker.messages)
    message = worker.messages[0]
    assert message["To"] == "charlie@gfc.example"
    body = message.get_body(("plain",)).get_content()
    assert "CompressedSamples" not in body + message["Subject"]
    link = re.search(r"https?://[^/\s]+(/shares/[0-9a-f-]+/)", body).group(1)  # type: ignore[union-attr]
    reader = Client()
    reader.post("/accounts/login/", {"login": "charlie@gfc.example", "password": PASSWORD})
    assert reader.get(link).status_code == 200
    _wait_for(lambda: Share.objects.get().notify_status == NotifyStatus.SENT)
    sent = client_for(bob).get("/sent/").content.decode()
    assert "charlie@gfc.example" in sent


def test_the_worker_completes_quiet_studies_in_the_database(worker: Inbox, krmc) -> None:
    study = Study.objects.create(
        facility=krmc,
        study_instance_uid="1.2.3.77",
        last_received_at=timezone.now() - timedelta(minutes=10),
    )
    studies_complete_quiet.delay()
    _wait_for(lambda: Study.objects.get(pk=study.pk).status == StudyStatus.COMPLETE)


# A line the logging module wrote: an ISO 8601 UTC time with a Z (relay.logs.UtcFormatter).
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)


def test_the_workers_log_is_in_utc_like_every_other_process(worker: Inbox) -> None:
    """Celery's own log lines (a task received and finished) go through Relay's logging: UTC
    with a Z, not Celery's local time without an offset (issue 18: logs mixed Denver time and
    UTC), and through the same redaction as the web's."""
    assert worker.worker_log is not None
    studies_complete_quiet.delay()

    def finished() -> bool:
        text = worker.worker_log.read_text(errors="replace")  # type: ignore[union-attr]
        return "studies_complete_quiet" in text and "succeeded" in text

    _wait_for(finished)
    lines = worker.worker_log.read_text(errors="replace").splitlines()
    task_lines = [ln for ln in lines if "studies_complete_quiet[" in ln]  # not the banner
    assert task_lines and all(LOG_LINE.match(ln) for ln in task_lines), task_lines
    stamp = LOG_LINE.match(task_lines[-1]).group(1)  # type: ignore[union-attr]
    written = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - written).total_seconds()) < 120
