"""Backups that restore (issue 18, item 4): the restore drill an operator would run.

Studies uploaded through the API, a share and its recipient's look, audit events and an issued
invoice; `manage.py backup` run as the operator runs it (a child process); the database dropped
and made again, empty; `manage.py restore` into it; then Relay started on the restored database
(gunicorn, a child process) shows the study and its images to the recipient, the invoice is
the same document, and the audit trail holds every event and is still append-only. Then what
must go wrong loudly: a database that is not empty, an image missing from storage, a file cut
short or altered, a wrong passphrase. And the embedded default's SQLite path.
"""

from __future__ import annotations

import gzip
import hashlib
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from django.conf import settings

from billing.invoicing import invoice_month
from billing.models import Invoice
from portal.models import AuditAction, AuditEvent, Facility, Membership, User
from tests.billing.factories import deliver, local
from tests.helpers import client_for, dicom_bytes, require_postgresql, upload
from tests.server_process import ROOT, database_url_of_this_run, relay_environment, relay_server
from transfers.models import Instance, Study
from transfers.sharing.services import share_create

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
PATIENT_ID = "PID-DRILL-1"
PASSPHRASE = "a drill passphrase, kept apart from the backups"


def _manage(
    tmp_path: Path, args: list[str], *, database_url: str, media: Path
) -> subprocess.CompletedProcess[str]:
    """`manage.py ARGS` as an operator runs it, with the test's image folder."""
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=relay_environment(tmp_path, database_url=database_url, env={"MEDIA_ROOT": str(media)}),
        capture_output=True,
        text=True,
        check=False,
    )


def _manage_ok(
    tmp_path: Path, args: list[str], *, database_url: str, media: Path
) -> subprocess.CompletedProcess[str]:
    done = _manage(tmp_path, args, database_url=database_url, media=media)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _admin(url: str, statement: str) -> None:
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
def wiped_url() -> Iterator[str]:
    """A database of the test's own on the test server: dropped and made again, empty, as after
    the disaster the backup is for. Dropped afterwards."""
    require_postgresql("the restore drill loads a pg_dump backup into PostgreSQL")
    name = f"relay_drill_{uuid.uuid4().hex[:10]}"
    url = urlunsplit(urlsplit(database_url_of_this_run())._replace(path=f"/{name}"))
    _admin(url, f"DROP DATABASE IF EXISTS {name}")
    _admin(url, f"CREATE DATABASE {name}")
    yield url
    _admin(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())


def _tables(url: str) -> list[str]:
    return [r[0] for r in _rows(url, "SELECT tablename FROM pg_tables WHERE schemaname='public'")]


def _study_upload(client: Any, token: str, *, slices: int = 3) -> Study:
    for _ in range(slices):
        data = dicom_bytes(
            "CT_small.dcm",
            StudyInstanceUID=STUDY_UID,
            PatientName="Drill^Dora",
            PatientID=PATIENT_ID,
            StudyDescription="CT DRILL",
        )
        assert upload(client, data, token=token).status_code == 201
    return Study.objects.get(study_instance_uid=STUDY_UID)


def _invoice_pdf(client: Any, invoice: Invoice) -> bytes:
    response = client.get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/pdf/")
    assert response.status_code == 200
    return bytes(response.content)


def _cookie(client: Any) -> dict[str, str]:
    name = settings.SESSION_COOKIE_NAME
    return {"Cookie": f"{name}={client.cookies[name].value}"}


@pytest.fixture
def drill_data(client: Any, bob: User, bob_token: str, gfc: Facility, dana: User) -> dict[str, Any]:
    """What a month of Relay leaves: a study uploaded through the API, shared with Great Falls
    and opened there, audit events, and Great Falls' invoice for March 2025."""
    study = _study_upload(client, bob_token)
    share, _ = share_create(
        facility=study.facility, created_by=bob, studies=[study], kind="facility",
        recipient_facility=gfc,
    )  # fmt: skip
    dana_client = client_for(dana)
    assert dana_client.get(f"/studies/{study.uuid}/").status_code == 200
    deliver(gfc, nbytes=3 * 10**9, images=30, at=local(date(2025, 3, 2)), study=study)
    invoice_month(year=2025, month=3)
    invoice = Invoice.objects.get(facility=gfc)
    gfc_admin = User.objects.create_user(email="admin@gfc.example", password="x" * 14)
    Membership.objects.create(user=gfc_admin, facility=gfc, role="admin")
    admin_client = client_for(gfc_admin)
    return {
        "study": study,
        "share": share,
        "dana": dana_client,
        "gfc_admin": admin_client,
        "invoice": invoice,
        "invoice_pdf": _invoice_pdf(admin_client, invoice),
    }


def _audit_rows(url: str) -> list[tuple[Any, ...]]:
    return _rows(
        url,
        "SELECT id, at, action, outcome, actor_email, facility_id, study_instance_uid,"
        " patient_id, detail::text FROM portal_auditevent ORDER BY id",
    )


def _invoice_rows(url: str) -> list[tuple[Any, ...]]:
    return _rows(
        url,
        "SELECT i.number, i.total, i.currency, i.issued_at, l.position, l.description, l.amount"
        " FROM billing_invoice i JOIN billing_invoiceline l ON l.invoice_id = i.id"
        " ORDER BY i.number, l.position",
    )


@pytest.mark.django_db(transaction=True)
def test_it_restores_a_wiped_database_with_studies_viewable_audit_intact_invoices_unchanged(
    tmp_path: Path, _private_storage: Path, drill_data: dict[str, Any], wiped_url: str
) -> None:
    media = _private_storage
    source_url = database_url_of_this_run()
    study: Study = drill_data["study"]
    instance = Instance.objects.filter(series__study=study).first()
    assert instance is not None and instance.rows and instance.columns
    sop_uid = instance.sop_instance_uid
    audit_before = _audit_rows(source_url)
    invoices_before = _invoice_rows(source_url)
    assert invoices_before and len(audit_before) >= 5

    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    backups = tmp_path / "backups"
    backups.mkdir()
    made = _manage(
        tmp_path, ["backup", str(backups), "--passphrase-file", str(passphrase)],
        database_url=source_url, media=media,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    (backup,) = backups.iterdir()
    assert backup.name.endswith(".tar.enc")
    assert backup.stat().st_mode & 0o777 == 0o600
    sha256 = hashlib.sha256(backup.read_bytes()).hexdigest()
    assert f"SHA-256 {sha256}" in made.stdout
    # The images are not in the file, and nothing on the terminal names the patient.
    assert b"DICM" not in backup.read_bytes() and PATIENT_ID.encode() not in backup.read_bytes()
    assert PATIENT_ID not in made.stdout + made.stderr and STUDY_UID not in made.stdout
    # The live trail says who took a copy of everyone's data, and which file it is.
    event = AuditEvent.objects.get(action=AuditAction.BACKUP)
    assert event.detail["sha256"] == sha256 and event.detail["file"] == backup.name
    # A second backup never overwrites the first.
    again = _manage(
        tmp_path, ["backup", str(backup), "--passphrase-file", str(passphrase)],
        database_url=source_url, media=media,
    )  # fmt: skip
    assert again.returncode != 0 and "already exists" in again.stderr
    assert hashlib.sha256(backup.read_bytes()).hexdigest() == sha256

    assert _tables(wiped_url) == []
    restored = _manage(
        tmp_path, ["restore", str(backup), "--passphrase-file", str(passphrase)],
        database_url=wiped_url, media=media,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "All 3 objects are there" in restored.stdout
    assert "Restore complete." in restored.stdout
    assert PATIENT_ID not in restored.stdout + restored.stderr
    assert STUDY_UID not in restored.stdout + restored.stderr

    # The audit trail: every event as it was, then the restore's own; still append-only.
    audit_after = _audit_rows(wiped_url)
    assert audit_after[: len(audit_before)] == audit_before
    (restore_event,) = audit_after[len(audit_before) :]
    assert restore_event[2] == "restore" and restore_event[3] == "success"
    assert restore_event[0] > audit_before[-1][0]
    with psycopg.connect(wiped_url) as conn, pytest.raises(psycopg.errors.RaiseException):
        conn.execute(
            "UPDATE portal_auditevent SET outcome = 'failure' WHERE id = %s", [audit_before[0][0]]
        )
    with psycopg.connect(wiped_url) as conn, pytest.raises(psycopg.errors.RaiseException):
        conn.execute("DELETE FROM portal_auditevent")
    # The invoices: the same rows, and (below) the same document.
    assert _invoice_rows(wiped_url) == invoices_before

    with relay_server(
        tmp_path, database_url=wiped_url,
        env={"MEDIA_ROOT": str(media), "CELERY_TASK_ALWAYS_EAGER": "1"},
    ) as server:  # fmt: skip
        recipient = _cookie(drill_data["dana"])
        page = server.request("GET", f"/studies/{study.uuid}/", headers=recipient)
        viewer = server.request("GET", f"/studies/{study.uuid}/view/", headers=recipient)
        frame = server.request(
            "GET", f"/studies/{study.uuid}/view/frames/{sop_uid}/0/", headers=recipient
        )
        pdf = server.request(
            "GET",
            f"/facilities/gfc/billing/invoices/{drill_data['invoice'].uuid}/pdf/",
            headers=_cookie(drill_data["gfc_admin"]),
        )
    assert page.status == 200, page.body[:500]
    assert b"CT DRILL" in page.body
    assert viewer.status == 200
    assert frame.status == 200, frame.body[:500]
    # The frame's pixel values, decoded from the stored object the restored row points at.
    assert len(gzip.decompress(frame.body)) == instance.rows * instance.columns * 2
    assert pdf.status == 200
    assert pdf.body == drill_data["invoice_pdf"]
    # The recipient's look at the restored study is audited after the restore, as any other.
    since = _audit_rows(wiped_url)[len(audit_before) + 1 :]
    assert ("study_view", "dana@gfc.example") in {(row[2], row[4]) for row in since}


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_database_that_is_not_empty(
    tmp_path: Path, _private_storage: Path, bob_token: str, client: Any
) -> None:
    require_postgresql("the refusal is of a PostgreSQL database that holds Relay's tables")
    _study_upload(client, bob_token, slices=1)
    source_url = database_url_of_this_run()
    backup = tmp_path / "relay.tar"
    made = _manage(
        tmp_path, ["backup", str(backup)], database_url=source_url, media=_private_storage
    )
    assert made.returncode == 0, made.stderr
    assert "not encrypted" in made.stderr  # the operator is told to keep it on encrypted storage
    Study.objects.update(description="CHANGED AFTER THE BACKUP")
    events = AuditEvent.objects.count()

    refused = _manage(
        tmp_path, ["restore", str(backup)], database_url=source_url, media=_private_storage
    )

    assert refused.returncode == 1
    assert "is not empty" in refused.stderr and "--replace" in refused.stderr
    assert Study.objects.get().description == "CHANGED AFTER THE BACKUP"
    assert AuditEvent.objects.count() == events


@pytest.mark.django_db(transaction=True)
def test_it_replaces_a_database_only_when_told_to(
    tmp_path: Path, _private_storage: Path, bob_token: str, client: Any, wiped_url: str
) -> None:
    _study_upload(client, bob_token, slices=1)
    backup = tmp_path / "relay.tar"
    source_url = database_url_of_this_run()
    _manage_ok(tmp_path, ["backup", str(backup)], database_url=source_url, media=_private_storage)
    _manage_ok(tmp_path, ["restore", str(backup)], database_url=wiped_url, media=_private_storage)
    with psycopg.connect(wiped_url) as conn:
        conn.execute("UPDATE transfers_study SET description = 'CHANGED'")

    replaced = _manage(
        tmp_path,
        ["restore", str(backup), "--replace"],
        database_url=wiped_url,
        media=_private_storage,
    )

    assert replaced.returncode == 0, replaced.stderr
    assert _rows(wiped_url, "SELECT description FROM transfers_study") == [("CT DRILL",)]
    actions = _rows(wiped_url, "SELECT action FROM portal_auditevent ORDER BY id")
    assert actions[-1] == ("restore",)


@pytest.mark.django_db(transaction=True)
def test_it_reports_an_image_missing_from_storage_without_naming_it_on_the_terminal(
    tmp_path: Path, _private_storage: Path, bob_token: str, client: Any, wiped_url: str
) -> None:
    media = _private_storage
    study = _study_upload(client, bob_token, slices=2)
    backup = tmp_path / "relay.tar"
    _manage_ok(
        tmp_path, ["backup", str(backup)], database_url=database_url_of_this_run(), media=media
    )
    lost = Instance.objects.filter(series__study=study).order_by("pk").first()
    assert lost is not None
    kept = (media / lost.storage_key).read_bytes()
    (media / lost.storage_key).unlink()
    problems = tmp_path / "problems.txt"

    restored = _manage(
        tmp_path, ["restore", str(backup), "--problems-file", str(problems)],
        database_url=wiped_url, media=media,
    )  # fmt: skip

    assert restored.returncode == 1
    assert "1 missing (of 2)" in restored.stderr
    assert str(problems) in restored.stderr
    assert STUDY_UID not in restored.stdout + restored.stderr
    assert problems.stat().st_mode & 0o777 == 0o600
    assert f"missing\tinstance\t{lost.storage_key}" in problems.read_text()
    # The database is there (the images can be put back); the trail says the restore failed.
    restore_event = _rows(
        wiped_url,
        "SELECT action, outcome, detail->>'objects_missing' FROM portal_auditevent ORDER BY id DESC LIMIT 1",
    )
    assert restore_event == [("restore", "failure", "1")]

    # Put back from the bucket's versions (here: the file), the check passes.
    (media / lost.storage_key).write_bytes(kept)
    checked = _manage(
        tmp_path, ["restore", str(backup), "--check-storage"], database_url=wiped_url, media=media
    )
    assert checked.returncode == 0, checked.stderr
    assert "All 2 objects are there" in checked.stdout
    # A copy of another size is not the object the database recorded.
    (media / lost.storage_key).write_bytes(kept + b"\0")
    wrong = _manage(
        tmp_path, ["restore", str(backup), "--check-storage", "--problems-file", str(tmp_path / "p2")],
        database_url=wiped_url, media=media,
    )  # fmt: skip
    assert wrong.returncode == 1 and "1 wrong size" in wrong.stderr


@pytest.mark.django_db(transaction=True)
def test_a_backup_cut_short_altered_or_locked_is_refused_and_changes_nothing(
    tmp_path: Path, _private_storage: Path, bob_token: str, client: Any, wiped_url: str
) -> None:
    media = _private_storage
    _study_upload(client, bob_token, slices=1)
    source_url = database_url_of_this_run()
    plain, sealed = tmp_path / "plain.tar", tmp_path / "sealed.tar.enc"
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE)
    passphrase.chmod(0o600)
    _manage_ok(tmp_path, ["backup", str(plain)], database_url=source_url, media=media)
    _manage_ok(
        tmp_path, ["backup", str(sealed), "--passphrase-file", str(passphrase)],
        database_url=source_url, media=media,
    )  # fmt: skip
    data, sealed_data = plain.read_bytes(), sealed.read_bytes()
    dump_at = data.index(b"PGDMP")  # pg_dump's custom format starts so
    wrong = tmp_path / "wrong-passphrase"
    wrong.write_text("not the passphrase at all")
    wrong.chmod(0o600)

    cases = {
        "cut.tar": (data[: len(data) // 2], [], "cut short"),
        "altered.tar": (data[: dump_at + 200] + bytes([data[dump_at + 200] ^ 1]) + data[dump_at + 201 :], [], "does not match the checksum"),
        "cut.tar.enc": (sealed_data[: len(sealed_data) - 100], ["--passphrase-file", str(passphrase)], "does not open"),
        "altered.tar.enc": (sealed_data[:500] + bytes([sealed_data[500] ^ 1]) + sealed_data[501:], ["--passphrase-file", str(passphrase)], "does not open"),
        "locked.tar.enc": (sealed_data, ["--passphrase-file", str(wrong)], "does not open"),
        "no-passphrase.tar.enc": (sealed_data, [], "is encrypted"),
    }  # fmt: skip
    for name, (content, extra, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        refused = _manage(
            tmp_path, ["restore", str(tmp_path / name), *extra], database_url=wiped_url, media=media
        )
        assert refused.returncode == 1, name
        assert message in refused.stderr, (name, refused.stderr)
        assert _tables(wiped_url) == [], name  # nothing was changed

    # The untouched files restore.
    ok = _manage(
        tmp_path,
        ["restore", str(sealed), "--passphrase-file", str(passphrase)],
        database_url=wiped_url,
        media=media,
    )
    assert ok.returncode == 0, ok.stderr


def _sqlite_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def test_the_embedded_sqlite_database_backs_up_and_restores(tmp_path: Path) -> None:
    """The embedded default: a SQLite file, copied by sqlite3's online backup API; seed_demo's
    facilities, people and study (stored through Relay's ingest)."""
    media = tmp_path / "media"
    source_file = tmp_path / "relay.sqlite3"
    source = f"sqlite:///{source_file}"
    target_file = tmp_path / "restored" / "relay.sqlite3"
    target_file.parent.mkdir()
    target = f"sqlite:///{target_file}"
    _manage_ok(tmp_path, ["migrate", "--verbosity", "0"], database_url=source, media=media)
    _manage_ok(tmp_path, ["seed_demo"], database_url=source, media=media)
    backup = tmp_path / "relay.tar"
    _manage_ok(tmp_path, ["backup", str(backup)], database_url=source, media=media)
    assert backup.stat().st_mode & 0o777 == 0o600

    restored = _manage_ok(tmp_path, ["restore", str(backup)], database_url=target, media=media)

    assert "Restore complete." in restored.stdout
    assert target_file.stat().st_mode & 0o777 == 0o600  # a new file of patient data
    for table in ("transfers_study", "transfers_instance", "portal_user", "portal_facility"):
        query = f"SELECT * FROM {table} ORDER BY id"  # noqa: S608 - our table names
        assert _sqlite_rows(target_file, query) == _sqlite_rows(source_file, query)
    assert _sqlite_rows(target_file, "SELECT count(*) FROM transfers_instance")[0][0] > 0
    last = "SELECT action FROM portal_auditevent ORDER BY id DESC LIMIT 1"
    assert _sqlite_rows(target_file, last) == [("restore",)]
    # Loading it again over the restored file is refused.
    again = _manage(tmp_path, ["restore", str(backup)], database_url=target, media=media)
    assert again.returncode == 1 and "is not empty" in again.stderr
