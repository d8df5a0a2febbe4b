"""Expiry and purge: lapsed shares on the timeline, the sender's warning, and the image purge.

Images are real objects in the test's private store, uploaded through the API; time moves by
changing dates in the database.
"""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.storage import FileSystemStorage, storages
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import dicom_bytes, upload
from transfers.models import (
    Instance,
    Report,
    Series,
    Share,
    ShareEvent,
    ShareEventKind,
    Study,
    StudyStatus,
)
from transfers.purge import _study_claim, purge_expired, studies_purgeable
from transfers.reports import report_attach
from transfers.sharing.expiry import shares_mark_expired, shares_warn_expiring
from transfers.sharing.services import ShareError, share_create, share_extend, share_revoke

from . import test_s3_storage

# The S3 bucket (moto's S3 server on loopback) of the storage tests, for the purge on S3.
bucket = test_s3_storage.bucket

pytestmark = pytest.mark.django_db

PATIENT_NAME = "Purgeable^Patricia"
PATIENT_ID = "PID-4242"
DESCRIPTION = "CT CHEST WO CONTRAST"


def _upload_study(
    client: Any, token: str, *, slices: int = 3, facility: str = "krmc", **changes: Any
) -> Study:
    """One study of `slices` CT instances, complete."""
    study_uid = changes.pop("StudyInstanceUID", "1.2.826.0.1.3680043.8.498.1")
    for _ in range(slices):
        data = dicom_bytes(
            "CT_small.dcm",
            StudyInstanceUID=study_uid,
            PatientName=PATIENT_NAME,
            PatientID=PATIENT_ID,
            StudyDescription=DESCRIPTION,
            **changes,
        )
        assert upload(client, data, token=token, facility=facility).status_code == 201
    study = Study.objects.get(study_instance_uid=study_uid, facility__slug=facility)
    Study.objects.filter(pk=study.pk).update(status=StudyStatus.COMPLETE)
    study.refresh_from_db()
    return study


@pytest.fixture
def study(client: Any, bob_token: str) -> Study:
    return _upload_study(client, bob_token)


def _share(bob: User, study: Study, gfc: Facility) -> Share:
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
    )
    return share


def _expire(share: Share, *, days_ago: int = 1) -> None:
    Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() - timedelta(days=days_ago))


def _age(study: Study, *, days: int = 31) -> None:
    """The study was uploaded `days` days ago (retention is 30 days by default)."""
    then = timezone.now() - timedelta(days=days)
    Study.objects.filter(pk=study.pk).update(created_at=then, last_received_at=then)


def _keys(study: Study) -> list[str]:
    return list(Instance.objects.filter(series__study=study).values_list("storage_key", flat=True))


def _stored(keys: list[str]) -> list[bool]:
    return [storages["default"].exists(key) for key in keys]


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command("purge_expired", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


# --- the purge ------------------------------------------------------------------------------------


def test_it_purges_an_expired_share_past_retention_and_keeps_the_tombstone(bob, gfc, study):
    share = _share(bob, study, gfc)
    _expire(share)
    _age(study)
    keys = _keys(study)
    assert _stored(keys) == [True, True, True]
    size = study.size_bytes
    audited_before = AuditEvent.objects.count()

    output = _run()

    assert _stored(keys) == [False, False, False]
    tombstone = Study.objects.get(pk=study.pk)
    assert tombstone.purged_at is not None
    assert tombstone.purged_bytes == size > 0
    # What it was stays readable: patient, description, counts, and its series.
    assert tombstone.patient_name == PATIENT_NAME
    assert tombstone.description == DESCRIPTION
    assert tombstone.num_instances == 3
    assert tombstone.size_bytes == size
    assert Series.objects.filter(study=study).count() == 1
    assert not Instance.objects.filter(series__study=study).exists()
    # The audit trail stays, with one more event that says what the purge freed.
    assert AuditEvent.objects.count() == audited_before + 1
    assert AuditEvent.objects.filter(action=AuditAction.UPLOAD).count() == 3
    assert AuditEvent.objects.filter(action=AuditAction.SHARE_CREATE).count() == 1
    purge = AuditEvent.objects.get(action=AuditAction.PURGE)
    assert purge.study_instance_uid == study.study_instance_uid
    assert purge.facility == study.facility
    assert purge.detail["bytes_freed"] == size
    # The operator sees what went, per study and in total; the share's timeline got its receipt.
    assert f"purged study {study.uuid} of krmc" in output
    assert "3 object(s)" in output and f"({size} bytes)" in output
    assert "freed: 1 study(ies), 3 object(s)" in output
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.EXPIRED).count() == 1
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.PURGED).count() == 1
    # A purged study can no longer be shared.
    with pytest.raises(ShareError):
        _share(bob, tombstone, gfc)


def test_a_study_with_one_live_share_and_one_expired_is_untouched(bob, gfc, study, db):
    stluke = Facility.objects.create(name="St. Luke", slug="stluke")
    _expire(_share(bob, study, gfc))
    share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=stluke,
    )
    _age(study, days=400)
    keys = _keys(study)

    result = purge_expired()

    assert result.studies_purged == 0 and result.bytes_freed == 0
    assert _stored(keys) == [True, True, True]
    assert Study.objects.get(pk=study.pk).purged_at is None
    assert not AuditEvent.objects.filter(action=AuditAction.PURGE).exists()


def test_a_revoked_only_study_is_kept_until_retention_passes(bob, gfc, study):
    share_revoke(share=_share(bob, study, gfc), by=bob)
    _age(study, days=29)
    keys = _keys(study)

    assert purge_expired().studies_purged == 0
    assert _stored(keys) == [True, True, True]

    _age(study, days=31)
    result = purge_expired()
    assert result.freed == [(str(study.uuid), study.size_bytes)]
    assert _stored(keys) == [False, False, False]


def test_retention_is_the_owner_facilitys(bob, gfc, study, krmc):
    _expire(_share(bob, study, gfc))
    _age(study, days=31)
    Facility.objects.filter(pk=krmc.pk).update(retention_days=90)

    assert purge_expired().studies_purged == 0

    _age(study, days=91)
    assert purge_expired().studies_purged == 1


def test_a_study_never_shared_is_kept_for_retention_then_purged(study):
    keys = _keys(study)
    assert purge_expired().studies_purged == 0
    _age(study)
    assert purge_expired().studies_purged == 1
    assert _stored(keys) == [False, False, False]


def test_another_facilitys_study_is_judged_on_its_own(client, bob, gfc, study, charlie):
    """The same Study Instance UID at Great Falls, still within its retention, stays."""
    charlie_token = _token(charlie)
    theirs = _upload_study(
        client,
        charlie_token,
        slices=1,
        facility="gfc",
        StudyInstanceUID=study.study_instance_uid,
    )
    assert theirs.facility == gfc
    _age(study)
    purge_expired()
    assert _stored(_keys(theirs)) == [True]
    assert Study.objects.get(pk=theirs.pk).purged_at is None


def _token(user: User) -> str:
    from portal.models import ApiToken

    return ApiToken.issue(user=user, name="test")[1]


def test_the_dry_run_changes_nothing_and_prints_what_would_go(bob, gfc, study):
    _expire(_share(bob, study, gfc))
    _age(study)
    keys = _keys(study)

    output = _run("--dry-run")

    assert f"would purge study {study.uuid} of krmc" in output
    assert f"({study.size_bytes} bytes)" in output
    assert "would free: 1 study(ies), 3 object(s)" in output
    assert _stored(keys) == [True, True, True]
    assert Study.objects.get(pk=study.pk).purged_at is None
    assert Instance.objects.filter(series__study=study).count() == 3
    assert not AuditEvent.objects.filter(action=AuditAction.PURGE).exists()
    # Not even the timeline changes in a dry run.
    assert not ShareEvent.objects.filter(kind=ShareEventKind.EXPIRED).exists()


def test_a_second_run_frees_nothing(bob, gfc, study):
    _expire(_share(bob, study, gfc))
    _age(study)
    assert purge_expired().studies_purged == 1
    purged_at = Study.objects.get(pk=study.pk).purged_at

    second = purge_expired()

    assert (second.studies_purged, second.bytes_freed, second.objects_deleted) == (0, 0, 0)
    assert "freed: 0 study(ies), 0 object(s), 0 bytes (0 bytes)" in _run()
    assert Study.objects.get(pk=study.pk).purged_at == purged_at
    assert AuditEvent.objects.filter(action=AuditAction.PURGE).count() == 1
    assert ShareEvent.objects.filter(kind=ShareEventKind.PURGED).count() == 1


def test_a_report_goes_with_the_images(bob, gfc, study):
    pdf = SimpleUploadedFile("report.pdf", b"%PDF-1.4 findings", content_type="application/pdf")
    report = report_attach(study=study, by=bob, pdf=pdf)
    assert storages["default"].exists(report.storage_key)
    _expire(_share(bob, study, gfc))
    _age(study)

    result = purge_expired()

    assert not storages["default"].exists(report.storage_key)
    assert not Report.objects.filter(study=study).exists()
    assert result.objects_deleted == 4
    assert Study.objects.get(pk=study.pk).purged_bytes == study.size_bytes + report.size_bytes


def test_it_purges_from_an_s3_bucket(client, bob_token, bob, gfc, bucket):
    study = _upload_study(client, bob_token)
    keys = _keys(study)
    assert test_s3_storage._keys(bucket) == sorted(keys)
    _expire(_share(bob, study, gfc))
    _age(study)
    storages["default"].delete(keys[0])  # one already gone, as after a killed run

    result = purge_expired()

    assert test_s3_storage._keys(bucket) == []
    assert result.objects_deleted == 2
    assert result.freed == [(str(study.uuid), study.size_bytes)]
    assert purge_expired().studies_purged == 0


class StorageFailingAfterOneDelete(FileSystemStorage):
    """A store that fails like an unreachable bucket after deleting one object."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deletes = 0

    def delete(self, name: str) -> None:
        if self.deletes >= 1:
            raise OSError("connection reset by storage")
        self.deletes += 1
        super().delete(name)


def test_a_run_stopped_halfway_is_finished_by_the_next(settings, bob, gfc, study):
    _expire(_share(bob, study, gfc))
    _age(study)
    keys = _keys(study)
    size = study.size_bytes
    working = settings.STORAGES
    settings.STORAGES = {
        **working,
        "default": {
            **working["default"],
            "BACKEND": "tests.transfers.test_purge.StorageFailingAfterOneDelete",
        },
    }

    with pytest.raises(CommandError):
        _run()

    # Half done: one object gone, the rest still there, and the study already a tombstone that
    # nobody can share again while it waits for the next run.
    assert _stored(keys) == [False, True, True]
    stopped = Study.objects.get(pk=study.pk)
    assert stopped.purged_at is not None
    assert Instance.objects.filter(series__study=study).count() == 3
    assert not AuditEvent.objects.filter(action=AuditAction.PURGE).exists()
    with pytest.raises(ShareError):
        _share(bob, stopped, gfc)

    settings.STORAGES = working
    result = purge_expired()

    assert result.freed == [(str(study.uuid), size)]
    assert result.objects_deleted == 2  # the third was already gone, which is fine
    assert _stored(keys) == [False, False, False]
    tombstone = Study.objects.get(pk=study.pk)
    assert tombstone.purged_bytes == size
    assert tombstone.purged_at == stopped.purged_at
    assert AuditEvent.objects.filter(action=AuditAction.PURGE).count() == 1
    assert purge_expired().studies_purged == 0


def test_a_run_killed_between_objects_and_rows_is_finished_by_the_next(bob, gfc, study):
    """The claim committed and some objects were deleted, then the process died."""
    _expire(_share(bob, study, gfc))
    _age(study)
    keys = _keys(study)
    assert _study_claim(study=study, now=timezone.now())
    storages["default"].delete(keys[0])
    storages["default"].delete(keys[1])

    result = purge_expired()

    assert result.freed == [(str(study.uuid), study.size_bytes)]
    assert result.objects_deleted == 1
    assert _stored(keys) == [False, False, False]
    assert Study.objects.get(pk=study.pk).purged_bytes == study.size_bytes
    assert AuditEvent.objects.filter(action=AuditAction.PURGE).count() == 1


def test_a_share_made_while_the_purge_runs_wins(bob, gfc, study):
    """Between choosing the study and claiming it, someone shares it: the claim backs off."""
    _age(study)
    now = timezone.now()
    assert list(studies_purgeable(now=now)) == [study]
    _share(bob, study, gfc)

    assert not _study_claim(study=study, now=now)
    assert Study.objects.get(pk=study.pk).purged_at is None
    assert _stored(_keys(study)) == [True, True, True]


# --- share expiry ---------------------------------------------------------------------------------


def test_shares_mark_expired_writes_the_receipt_once(bob, gfc, study):
    share = _share(bob, study, gfc)
    live = _share(bob, study, gfc)
    revoked = _share(bob, study, gfc)
    share_revoke(share=revoked, by=bob)
    # Revoked three days ago, then its expiry passed yesterday: it never "expired".
    Share.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now() - timedelta(days=3))
    _expire(share, days_ago=2)
    _expire(revoked)
    ShareEvent.objects.update(at=timezone.now() - timedelta(days=10))  # made ten days ago

    assert shares_mark_expired() == 1
    assert shares_mark_expired() == 0

    event = ShareEvent.objects.get(kind=ShareEventKind.EXPIRED)
    share.refresh_from_db()
    assert event.share == share and event.at == share.expires_at
    assert not ShareEvent.objects.filter(share=live, kind=ShareEventKind.EXPIRED).exists()
    assert not ShareEvent.objects.filter(share=revoked, kind=ShareEventKind.EXPIRED).exists()
    assert list(share.events.values_list("kind", flat=True)) == ["created", "expired"]


def test_a_share_extended_after_it_lapsed_expires_again(bob, gfc, study):
    share = _share(bob, study, gfc)
    _expire(share)
    assert shares_mark_expired() == 1
    share.refresh_from_db()
    share_extend(share=share, by=bob, expires_at=timezone.now() + timedelta(days=5))
    assert shares_mark_expired() == 0
    _expire(share, days_ago=0)
    assert shares_mark_expired() == 1
    assert share.events.filter(kind=ShareEventKind.EXPIRED).count() == 2


def test_the_sender_is_warned_once_without_patient_information(
    bob, gfc, study, mailoutbox, django_capture_on_commit_callbacks
):
    share = _share(bob, study, gfc)
    far = _share(bob, study, gfc)
    # Made a moment ago to last two days: its creator chose that, no warning needed.
    short = _share(bob, study, gfc)
    Share.objects.filter(pk=short.pk).update(expires_at=timezone.now() + timedelta(days=2))
    Share.objects.filter(pk=share.pk).update(
        created_at=timezone.now() - timedelta(days=20),
        expires_at=timezone.now() + timedelta(days=2),
    )
    mailoutbox.clear()

    with django_capture_on_commit_callbacks(execute=True):
        assert shares_warn_expiring(days=3) == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert shares_warn_expiring(days=3) == 0

    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert message.to == ["bob@krmc.example"]
    everything = message.subject + message.body + message.alternatives[0][0]
    assert "Great Falls Clinic" in message.subject
    assert f"/shares/{share.uuid}/" in message.body
    for secret in (
        PATIENT_NAME,
        "Purgeable",
        PATIENT_ID,
        DESCRIPTION,
        study.study_instance_uid,
        str(study.uuid),
    ):
        assert secret not in everything
    share.refresh_from_db()
    far.refresh_from_db()
    short.refresh_from_db()
    assert share.expiry_warned_at is not None
    assert far.expiry_warned_at is None and short.expiry_warned_at is None


def test_a_patient_links_warning_leaves_out_the_patients_address(
    bob, study, mailoutbox, django_capture_on_commit_callbacks
):
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        recipient_email="patricia@example.net",
        second_factor="pin",
        pin="582039",
    )
    Share.objects.filter(pk=share.pk).update(
        created_at=timezone.now() - timedelta(days=20),
        expires_at=timezone.now() + timedelta(days=1),
    )
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert shares_warn_expiring() == 1
    message = mailoutbox[0]
    assert "patricia" not in message.subject + message.body + message.alternatives[0][0]
    assert "a patient link" in message.body


def test_a_purged_study_sent_again_becomes_a_study_again(client, bob_token):
    from django.utils import timezone as tz

    from tests.helpers import read_testdata as _read
    from tests.helpers import upload as _upload
    from transfers.models import Instance as _Instance
    from transfers.models import Study as _Study

    assert _upload(client, _read("CT_small.dcm"), token=bob_token).status_code == 201
    _Study.objects.update(purged_at=tz.now())
    _Instance.objects.all().delete()
    assert _upload(client, _read("CT_small.dcm"), token=bob_token).status_code == 201
    study = _Study.objects.get()
    assert study.purged_at is None
    assert (study.num_series, study.num_instances) == (1, 1)


def test_renders_and_thumbnails_go_with_the_images(bob, gfc, study):
    from transfers.viewer.render import frame_render_get, series_thumbnail_key, thumbnail_get

    instance = Instance.objects.filter(series__study=study).first()
    series = Series.objects.get(study=study)
    assert frame_render_get(instance, 0).meta["error"] is None
    thumbnail_get(series)
    storage = storages["default"]
    render_keys = [k for k in _render_keys(storage, f"renders/{study.facility.uuid}/")]
    assert series_thumbnail_key(series) in render_keys and len(render_keys) >= 2
    _expire(_share(bob, study, gfc))
    _age(study)

    purge_expired()

    assert not any(storage.exists(k) for k in render_keys)


def _render_keys(storage, prefix):
    folders, files = storage.listdir(prefix)
    yield from (prefix + name for name in files)
    for folder in folders:
        yield from _render_keys(storage, f"{prefix}{folder}/")
