"""Images that arrive after a share was notified: each notified share is told once per settled
batch ("N new images added", e-mail and timeline), never image by image, never for duplicates,
and the study stays open to its recipients meanwhile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from django.urls import reverse

from portal.models import Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from tests.transfers.dicom.test_gateway import _storescu, gateway  # noqa: F401  (fixture)
from tests.transfers.test_manifest import _entry, _manifest
from transfers.completion import expectations_announce, studies_complete_quiet
from transfers.models import (
    Instance,
    NotifyStatus,
    RoutingRule,
    Share,
    ShareEvent,
    ShareEventKind,
    Study,
    StudyStatus,
)
from transfers.sharing.services import share_create
from transfers.viewer.render import _frames_missing, _storage

STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"


def _slices(n: int, *, series: str = "1.2.826.0.1.3680043.8.498.4242.1") -> list[bytes]:
    return [
        dicom_bytes(
            "CT_small.dcm", StudyInstanceUID=STUDY_UID, SeriesInstanceUID=series, InstanceNumber=i
        )
        for i in range(1, n + 1)
    ]


def _send(client: Client, token: str, files: list[bytes], capture: Any) -> dict[str, Any]:
    """What `relay send` does: upload every file, then the run's manifest."""
    for data in files:
        assert upload(client, data, token=token).status_code in (200, 201)
    with capture(execute=True):
        answer = _manifest(client, token, [_entry(d) for d in files]).json()
    return answer


def _share(study: Study, bob: User, capture: Any, **recipient: Any) -> Share:
    kind = "facility" if "recipient_facility" in recipient else "physician"
    with capture(execute=True):
        share, _ = share_create(
            facility=study.facility, created_by=bob, studies=[study], kind=kind, **recipient
        )
    return share


def _added_events(share: Share) -> list[str]:
    return list(
        ShareEvent.objects.filter(share=share, kind=ShareEventKind.UPDATED).values_list(
            "detail", flat=True
        )
    )


def _assert_no_phi(message: Any, study: Study) -> None:
    everything = message.subject + message.body + message.alternatives[0][0]
    for secret in (study.patient_name, study.patient_id, study.study_instance_uid):
        assert secret and secret not in everything


@pytest.mark.django_db
def test_a_settled_batch_of_late_images_is_told_once_per_notified_share(
    client, bob, bob_token, gfc, charlie, dana, mailoutbox, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    assert _send(client, bob_token, _slices(2), capture)["complete"]
    study = Study.objects.get()
    to_gfc = _share(study, bob, capture, recipient_facility=gfc)
    User.objects.create_user(email="welby@clinic.example", password="x-unused-9281")
    to_doctor = _share(study, bob, capture, recipient_email="welby@clinic.example")
    assert sorted(m.to[0] for m in mailoutbox) == [
        "charlie@gfc.example",
        "dana@gfc.example",
        "welby@clinic.example",
    ]
    mailoutbox.clear()

    # A late series: three more images of the same study, one by one.
    late = _slices(3, series="1.2.826.0.1.3680043.8.498.4242.2")
    for data in late:
        assert upload(client, data, token=bob_token).status_code == 201
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING
    # Nobody is told before the batch settles, and what was there stays open to the recipient.
    assert mailoutbox == []
    assert _added_events(to_gfc) == [] and _added_events(to_doctor) == []
    reader = client_for(charlie)
    assert reader.get(reverse("study_detail", args=[study.uuid])).status_code == 200
    assert reader.get(reverse("viewer_study_json", args=[study.uuid])).status_code == 200

    with capture(execute=True):
        answer = _manifest(client, bob_token, [_entry(d) for d in late]).json()
    assert answer["complete"] == [str(study.uuid)]
    study.refresh_from_db()
    assert study.status == StudyStatus.COMPLETE
    assert study.num_instances == 5
    assert sorted(m.to[0] for m in mailoutbox) == [
        "charlie@gfc.example",
        "dana@gfc.example",
        "welby@clinic.example",
    ]
    for message in mailoutbox:
        assert "3 images" in message.subject
        assert "3 new images" in message.body
        _assert_no_phi(message, study)
    assert _added_events(to_gfc) == ["3 new images added; e-mailed 2 recipient(s)"]
    assert _added_events(to_doctor) == ["3 new images added; e-mailed 1 recipient(s)"]
    # The timeline on the Sent page shows it.
    page = client_for(bob).get(reverse("share_detail", args=[to_gfc.uuid])).content.decode()
    assert "Images added · 3 new images added" in page
    # The new images are rendered for the viewer, as on first completion.
    storage = _storage()
    for instance in Instance.objects.filter(series__series_instance_uid__endswith=".2"):
        assert _frames_missing(storage, instance) == []

    # The same manifest again, or the same files sent again: nobody is told anything more.
    mailoutbox.clear()
    _send(client, bob_token, late, capture)
    assert mailoutbox == []
    assert len(_added_events(to_gfc)) == 1


@pytest.mark.django_db
def test_the_same_images_sent_again_notify_nobody_and_a_resend_with_more_counts_the_new_only(
    client, bob, bob_token, gfc, charlie, mailoutbox, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    files = _slices(3)
    _send(client, bob_token, files, capture)
    share = _share(Study.objects.get(), bob, capture, recipient_facility=gfc)
    assert len(mailoutbox) == 1
    mailoutbox.clear()

    answer = _send(client, bob_token, files, capture)

    assert answer["complete"] == [str(Study.objects.get().uuid)]
    assert mailoutbox == []
    assert _added_events(share) == []
    assert Study.objects.get().status == StudyStatus.COMPLETE

    # The whole study sent again with one image more: one image is new.
    _send(
        client, bob_token, [*files, *_slices(1, series="1.2.826.0.1.3680043.8.498.4242.9")], capture
    )
    assert [m.to for m in mailoutbox] == [["charlie@gfc.example"]]
    assert "1 image " in mailoutbox[0].subject
    assert _added_events(share) == ["1 new image added; e-mailed 1 recipient(s)"]


@pytest.mark.django_db
def test_a_share_not_yet_notified_gets_only_the_first_notice(
    client, bob, bob_token, gfc, charlie, mailoutbox, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    first, more = _slices(2), _slices(3, series="1.2.826.0.1.3680043.8.498.4242.2")
    for data in first:
        assert upload(client, data, token=bob_token).status_code == 201
    share = _share(Study.objects.get(), bob, capture, recipient_facility=gfc)
    assert share.notify_status == NotifyStatus.WAITING

    _send(client, bob_token, first + more, capture)

    assert len(mailoutbox) == 1
    assert "shared images with you" in mailoutbox[0].subject
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.SENT
    assert share.notified_instances == 5
    assert _added_events(share) == []


@pytest.mark.django_db
def test_announced_images_still_outstanding_hold_the_notice_back(
    client, bob, bob_token, gfc, charlie, mailoutbox, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    _send(client, bob_token, _slices(2), capture)
    study = Study.objects.get()
    share = _share(study, bob, capture, recipient_facility=gfc)
    mailoutbox.clear()
    late = _slices(3, series="1.2.826.0.1.3680043.8.498.4242.2")
    expectations_announce(
        facility=study.facility,
        entries=[{**_entry(d), "study_instance_uid": STUDY_UID} for d in late],
    )

    # Two of the three arrive and are listed; the third is still expected.
    answer = _send(client, bob_token, late[:2], capture)
    assert answer["incomplete"] == [str(study.uuid)]
    with capture(execute=True):
        studies_complete_quiet()
    assert mailoutbox == []
    assert _added_events(share) == []

    _send(client, bob_token, late[2:], capture)
    assert [m.to for m in mailoutbox] == [["charlie@gfc.example"]]
    assert _added_events(share) == ["3 new images added; e-mailed 1 recipient(s)"]


@pytest.mark.django_db
def test_an_smtp_failure_is_on_the_timeline_and_the_retry_tells_the_images(
    client,
    bob,
    bob_token,
    gfc,
    charlie,
    settings,
    free_tcp_port,
    mailoutbox,
    django_capture_on_commit_callbacks,
):
    capture = django_capture_on_commit_callbacks
    _send(client, bob_token, _slices(2), capture)
    share = _share(Study.objects.get(), bob, capture, recipient_facility=gfc)
    mailoutbox.clear()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_tcp_port  # nothing listens
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_TIMEOUT = 5
    from relay.celery import app

    app.conf.task_eager_propagates = False
    try:
        _send(client, bob_token, _slices(3, series="1.2.826.0.1.3680043.8.498.4242.2"), capture)
    finally:
        app.conf.task_eager_propagates = True
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.SENT  # the first notice stands
    assert share.notified_instances == 2  # the three are still to be told
    failed = ShareEvent.objects.filter(share=share, kind=ShareEventKind.NOTIFY_FAILED)
    assert failed.exists()
    assert "images added: ConnectionRefusedError" in failed.first().detail  # type: ignore[union-attr]

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    from transfers.sharing.tasks import share_notify_added

    share_notify_added.apply(args=(share.pk,))
    share_notify_added.apply(args=(share.pk,))  # run twice: told once
    assert [m.to for m in mail.outbox] == [["charlie@gfc.example"]]
    assert _added_events(share) == ["3 new images added; e-mailed 1 recipient(s)"]


@pytest.mark.django_db
def test_a_patient_link_gets_no_images_added_email(
    client, bob, bob_token, gfc, charlie, mailoutbox, django_capture_on_commit_callbacks
):
    """The patient link's only e-mail is the one with its token, sent when it is made; the
    flow sends no completion notice, so no 'images added' one either. The link shows them."""
    capture = django_capture_on_commit_callbacks
    _send(client, bob_token, _slices(2), capture)
    study = Study.objects.get()
    with capture(execute=True):
        share, _ = share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="patient",
            recipient_email="patient@home.example",
            second_factor="pin",
            pin="583920",
        )
    to_gfc = _share(study, bob, capture, recipient_facility=gfc)
    mailoutbox.clear()

    _send(client, bob_token, _slices(3, series="1.2.826.0.1.3680043.8.498.4242.2"), capture)

    # The facility the study was also shared with is told; the patient is not e-mailed.
    assert [m.to for m in mailoutbox] == [["charlie@gfc.example"]]
    assert _added_events(to_gfc) == ["3 new images added; e-mailed 1 recipient(s)"]
    assert _added_events(share) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.peer
def test_a_gateway_study_tells_its_routed_share_of_a_late_series_after_the_quiet_period(
    gateway: int,  # noqa: F811
    tmp_path: Path,
    alice: User,
    gfc: Facility,
    charlie: User,
    settings: Any,
) -> None:
    krmc = alice.memberships.get().facility
    RoutingRule.objects.create(
        facility=krmc, created_by=alice, calling_ae="PACS1", recipient_facility=gfc
    )

    def store(files: list[bytes], name: str) -> None:
        paths = []
        for n, data in enumerate(files):
            path = tmp_path / f"{name}{n}.dcm"
            path.write_bytes(data)
            paths.append(path)
        assert _storescu(gateway, paths, calling="PACS1").returncode == 0

    store(_slices(2), "first")
    settings.RELAY_STUDY_QUIET_SECONDS = 0
    studies_complete_quiet()
    share = Share.objects.get()
    assert [m.to for m in mail.outbox] == [["charlie@gfc.example"]]
    mail.outbox.clear()

    store(_slices(3, series="1.2.826.0.1.3680043.8.498.4242.2"), "late")
    # Still within the quiet period: nobody is told yet.
    settings.RELAY_STUDY_QUIET_SECONDS = 3600
    studies_complete_quiet()
    assert Study.objects.get().status == StudyStatus.RECEIVING
    assert mail.outbox == []
    assert _added_events(share) == []

    settings.RELAY_STUDY_QUIET_SECONDS = 0
    studies_complete_quiet()
    studies_complete_quiet()  # a second beat changes nothing

    assert Study.objects.get().status == StudyStatus.COMPLETE
    # The routing rule applied once: the late series joins the same share.
    assert Share.objects.count() == 1
    assert [m.to for m in mail.outbox] == [["charlie@gfc.example"]]
    assert "3 images" in mail.outbox[0].subject
    assert _added_events(share) == ["3 new images added; e-mailed 1 recipient(s)"]
