"""A real Celery worker process, on whatever broker and database this run is configured with
(Redis and PostgreSQL in CI, the file broker and SQLite by default), does the work it is sent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from portal.celery import app
from portal.services import invitation_create
from transfers.models import Study, StudyStatus
from transfers.tasks import studies_complete_quiet

ROOT = Path(__file__).resolve().parent.parent


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
) -> Iterator[Path]:
    """One worker for the module; each test brings its own (transactional) data."""
    tmp_path = tmp_path_factory.mktemp("worker")
    mail = tmp_path / "mail"
    broker = tmp_path / "broker"
    with django_db_blocker.unblock():
        database_url = _database_url()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
        "EMAIL_FILE_PATH": str(mail),
        "RELAY_BROKER_DIR": str(broker),
        "RELAY_STUDY_QUIET_SECONDS": "0",
        "RELAY_VAR_DIR": str(tmp_path / "var"),
        "SECRET_KEY": settings.SECRET_KEY,
    }
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    if not settings.REDIS_URL:
        # Point this process's producer at the same private broker folder as the worker.
        folders = {
            "data_folder_in": broker / "queue",
            "data_folder_out": broker / "queue",
            "processed_folder": broker / "processed",
            "control_folder": broker / "control",
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            **{k: str(v) for k, v in folders.items()},
            "store_processed": False,
        }
        # Connections made earlier in this run point at the default folder: start afresh.
        app._pool = None
        app.amqp._producer_pool = None
    app.conf.task_always_eager = False
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "portal",
            "worker",
            "-Q",
            "quick,slow",
            "--pool",
            "solo",
            "-l",
            "INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield mail
    finally:
        app.conf.task_always_eager = True
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        print(output.decode(errors="replace")[-4000:])


@pytest.fixture
def worker(_worker_process: Path, transactional_db: None) -> Iterator[Path]:
    app.conf.task_always_eager = False  # after conftest's autouse fixture made it eager
    yield _worker_process
    app.conf.task_always_eager = True


def _wait_for(check, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("the worker did not finish in time")


def test_the_worker_sends_an_invitation_email(worker: Path, alice) -> None:
    invitation_create(
        facility=alice.memberships.get().facility,
        email="new.reader@clinic.example",
        role="reader",
        invited_by=alice,
    )
    _wait_for(lambda: worker.exists() and any(worker.iterdir()))
    message = next(worker.iterdir()).read_text()
    assert "To: new.reader@clinic.example" in message
    assert "/invitations/" in message


def test_the_worker_completes_quiet_studies_in_the_database(worker: Path, krmc) -> None:
    study = Study.objects.create(
        facility=krmc,
        study_instance_uid="1.2.3.77",
        last_received_at=timezone.now() - timedelta(minutes=10),
    )
    studies_complete_quiet.delay()
    _wait_for(lambda: Study.objects.get(pk=study.pk).status == StudyStatus.COMPLETE)
