"""A study's life when things happen at once: uploads during a purge, a purge during a
reconciliation, a disc image built while its study goes, a notification for a study that grew
again, a manifest after a reconciliation. Nothing acknowledged is deleted; nothing deleted is
left behind."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.core import mail
from django.core.files.storage import storages
from django.test import Client
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, Facility, Outcome, User
from tests.helpers import dicom_bytes, upload
from transfers import ingest
from transfers.completion import manifest_apply
from transfers.media import discs as media
from transfers.models import (
    ExportStatus,
    Instance,
    MediaExport,
    NotifyStatus,
    Share,
    Study,
    StudyStatus,
)
from transfers.purge import _study_claim, purge_expired
from transfers.reconcile.services import Identity, study_reconcile
from transfers.reconcile.tasks import study_reconcile_task
from transfers.sharing.notify import share_notify_send
from transfers.sharing.services import share_create, shares_notify_completed

pytestmark = pytest.mark.django_db

STUDY_UID = "1.2.826.0.1.3680043.8.498.31"


def _file(**changes: Any) -> bytes:
    return dicom_bytes("CT_small.dcm", StudyInstanceUID=STUDY_UID, PatientID="FOREIGN-1", **changes)


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    for _ in range(2):
        assert upload(client, _file(), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _purgeable(study: Study) -> None:
    """Never shared, uploaded long past the facility's retention."""
    then = timezone.now() - timedelta(days=40)
    Study.objects.filter(pk=study.pk).update(created_at=then, last_received_at=then)


def _keys(study: Study) -> list[str]:
    return list(Instance.objects.filter(series__study=study).values_list("storage_key", flat=True))


def test_an_upload_while_a_purge_empties_the_study_is_refused_then_taken_after(
    client: Client, bob_token: str, study: Study, django_capture_on_commit_callbacks: Any
) -> None:
    _purgeable(study)
    assert _study_claim(study=study, now=timezone.now())  # the purge claimed it, then stopped

    late = _file()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = upload(client, late, token=bob_token)
    assert response.status_code == 503
    assert "being deleted" in response.json()["reason"]
    assert callbacks, "the purge is asked to finish now"
    # A copy already indexed in the claimed study is not "already stored" either: it is going.
    first = Instance.objects.filter(series__study=study).order_by("pk").first()
    assert first is not None
    with storages["default"].open(first.storage_key) as f:
        assert upload(client, f.read(), token=bob_token).status_code == 503

    purge_expired()
    assert not Instance.objects.exists()
    # Once emptied, the same study sent again is a study again, with what was acknowledged.
    assert upload(client, late, token=bob_token).status_code == 201
    revived = Study.objects.get()
    assert revived.purged_at is None and revived.num_instances == 1
    assert [storages["default"].exists(k) for k in _keys(revived)] == [True]


def test_an_upload_overtaken_by_the_purges_claim_is_rolled_back(
    client: Client, bob_token: str, study: Study
) -> None:
    """The claim commits after the upload found the study but before it counted the instance
    (on PostgreSQL one statement writes the rows and the counters; the claim lands between the
    lookup of the series and that statement, the narrowest window both paths have)."""
    real_lookup = ingest._lookup

    def lookup_then_claim(*args: Any, **kwargs: Any) -> Any:
        found = real_lookup(*args, **kwargs)
        Study.objects.filter(pk=study.pk).update(purged_at=timezone.now())
        return found

    before = set(_keys(study))
    with mock.patch.object(ingest, "_lookup", side_effect=lookup_then_claim):
        response = upload(client, _file(), token=bob_token)

    assert response.status_code == 503
    assert set(_keys(study)) == before  # no row for it
    # ... and no object: only the study's earlier files are in the store.
    _, files = storages["default"].listdir(before.pop().rsplit("/", 1)[0] + "/")
    assert len(files) == 2


def test_a_study_being_reconciled_is_not_purged(study: Study) -> None:
    _purgeable(study)
    Study.objects.filter(pk=study.pk).update(reconcile_running=True)
    keys = _keys(study)

    assert purge_expired().studies_purged == 0
    assert all(storages["default"].exists(k) for k in keys)


def test_a_reconciliation_that_keeps_failing_releases_the_study(study: Study) -> None:
    Study.objects.filter(pk=study.pk).update(reconcile_running=True)
    storages["default"].delete(_keys(study)[0])  # an unreadable copy

    with pytest.raises(FileNotFoundError):
        study_reconcile_task.apply(
            args=[study.pk, "KR-1", "DOE^JANE", ""], retries=study_reconcile_task.max_retries
        )

    study.refresh_from_db()
    assert not study.reconcile_running  # sharing and pushing work again
    event = AuditEvent.objects.get(action=AuditAction.PATIENT_RECONCILE)
    assert event.outcome == Outcome.FAILURE and "FileNotFoundError" in event.detail["reason"]


def test_a_disc_image_finished_after_its_study_was_purged_is_not_left_behind(
    study: Study, bob: User
) -> None:
    export = MediaExport.objects.create(study=study, requested_by=bob)
    real_build = media.iso_build

    def build_while_purged(*args: Any, **kwargs: Any) -> Any:
        done = real_build(*args, **kwargs)
        MediaExport.objects.filter(pk=export.pk).delete()  # the purge took the row meanwhile
        return done

    with mock.patch.object(media, "iso_build", side_effect=build_while_purged):
        media.media_build(export=export)

    exports = f"exports/{study.facility.uuid}/{study.uuid}/"
    try:
        _, files = storages["default"].listdir(exports)
    except FileNotFoundError:
        files = []
    assert not [name for name in files if name.endswith(".iso")]
    assert not MediaExport.objects.filter(status=ExportStatus.READY).exists()


def test_a_queued_notification_waits_when_the_study_grows_again(
    study: Study, bob: User, gfc: Facility, settings: Any
) -> None:
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
    )
    Share.objects.filter(pk=share.pk).update(notify_status=NotifyStatus.QUEUED)
    Study.objects.filter(pk=study.pk).update(status=StudyStatus.RECEIVING)  # more arrived

    assert share_notify_send(share_id=share.pk) == "waiting"
    assert not mail.outbox
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.WAITING

    Study.objects.filter(pk=study.pk).update(status=StudyStatus.COMPLETE)
    shares_notify_completed()
    share.refresh_from_db()
    assert share.notify_status in (NotifyStatus.QUEUED, NotifyStatus.SENT)


def test_a_manifest_sent_after_a_reconciliation_still_completes_the_study(
    client: Client, bob_token: str, krmc: Facility
) -> None:
    files = [_file() for _ in range(2)]
    for data in files:
        assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get()
    study_reconcile(study=study, identity=Identity("KR-1", "DOE^JANE", ""))
    Study.objects.filter(pk=study.pk).update(status=StudyStatus.RECEIVING)

    entries = []
    for data in files:
        uid = Instance.objects.get(sha256__isnull=False, original_sha256=_sha(data))
        entries.append({"sop_instance_uid": uid.sop_instance_uid, "sha256": _sha(data)})
    result = manifest_apply(facility=krmc, entries=entries)

    assert result.mismatched == [] and result.complete == [str(study.uuid)]


def _sha(data: bytes) -> str:
    """The hash of the copy as stored: the preamble is zeroed on ingest, as the client does."""
    return hashlib.sha256(b"\0" * 128 + data[128:]).hexdigest()
