"""Who sees what through DICOMweb: the portal's rules. An outsider finds nothing and retrieves
nothing (404, audited); a share's recipient sees the shared study only; a view-only share (or
role) views metadata and frames but takes no copy; a facility's token sees that facility only;
purged studies are gone. A recipient's retrieval is audited and metered once."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from billing.models import UsageRecord
from portal.models import ApiToken, AuditEvent, Facility, Membership, TokenAccess, User
from tests.helpers import PASSWORD, client_for
from transfers.models import Instance, ShareEvent, ShareEventKind, Study
from transfers.sharing.services import share_create

from .conftest import UploadedStudy, bearer, study_upload

pytestmark = pytest.mark.django_db

ONE = (("CT_small.dcm", 1),)
MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _urls(study: UploadedStudy) -> dict[str, str]:
    series = study.series_of("CT_small.dcm")
    sop = study.sop_of("CT_small.dcm")
    instance = f"/dicom-web/studies/{study.uid}/series/{series}/instances/{sop}"
    return {
        "study": f"/dicom-web/studies/{study.uid}",
        "series": f"/dicom-web/studies/{study.uid}/series/{series}",
        "instance": instance,
        "metadata": f"/dicom-web/studies/{study.uid}/metadata",
        "frames": instance + "/frames/1",
        "bulk": instance + "/bulk/7FE00010",
        "series_search": f"/dicom-web/studies/{study.uid}/series",
    }


def _token(user: User, facility: Facility | None = None) -> str:
    return ApiToken.issue(user=user, name="dw", facility=facility, access=TokenAccess.READ)[1]


def _found(client: Client, headers: dict[str, Any]) -> set[str]:
    answer = client.get("/dicom-web/studies", **headers)
    assert answer.status_code == 200
    return {a["0020000D"]["Value"][0] for a in answer.json()}


def _by_instance_uid(client: Client, headers: dict[str, Any], sop: str) -> list[str]:
    answer = client.get("/dicom-web/instances", {"SOPInstanceUID": sop}, **headers)
    assert answer.status_code == 200
    return [a["00080018"]["Value"][0] for a in answer.json()]


def _body(answer: Any) -> bytes:
    return b"".join(answer.streaming_content) if answer.streaming else answer.content


def test_an_outsider_finds_nothing_and_retrieves_nothing(
    client: Client, ct_study: UploadedStudy, charlie: User
) -> None:
    for headers in (bearer(_token(charlie)), {}):
        outsider = client_for(charlie) if not headers else client
        assert _found(outsider, headers) == set()
        assert outsider.get(_urls(ct_study)["series_search"], **headers).json() == []
        assert _by_instance_uid(outsider, headers, ct_study.sop_of("CT_small.dcm")) == []
        for name in ("study", "series", "instance", "metadata", "frames", "bulk"):
            accept = MULTIPART_DICOM if name in ("study", "series", "instance") else "*/*"
            answer = outsider.get(_urls(ct_study)[name], HTTP_ACCEPT=accept, **headers)
            assert answer.status_code == 404, name
    refused = AuditEvent.objects.filter(action="access_denied", actor=charlie)
    assert refused.count() == 12
    # The holder's admins see who was refused: the event names the study.
    assert refused.filter(study_instance_uid=ct_study.uid).count() == 12


def test_no_credentials_is_401(client: Client, ct_study: UploadedStudy) -> None:
    assert client.get("/dicom-web/studies").status_code == 401
    assert client.get(_urls(ct_study)["study"]).status_code == 401


def test_a_recipient_sees_the_shared_study_only_and_a_view_only_share_takes_no_copy(
    client: Client, bob: User, bob_token: str, gfc: Facility, dana: User
) -> None:
    shared = study_upload(client, bob_token, sources=ONE)
    study_upload(client, bob_token, patient_name="OTHER^ONE", sources=ONE)
    share_create(
        facility=shared.study.facility,
        created_by=bob,
        studies=[shared.study],
        kind="facility",
        recipient_facility=gfc,
        can_download=False,
    )
    headers = bearer(_token(dana))
    assert _found(client, headers) == {shared.uid}
    # Found by its SOP Instance UID too (that search goes through the holders' facilities).
    sop = shared.sop_of("CT_small.dcm")
    assert _by_instance_uid(client, headers, sop) == [sop]
    urls = _urls(shared)
    assert client.get(urls["metadata"], **headers).status_code == 200
    frames = client.get(
        urls["frames"], HTTP_ACCEPT="multipart/related; type=application/octet-stream", **headers
    )
    assert frames.status_code == 200 and _body(frames)
    for name in ("study", "series", "instance"):
        answer = client.get(urls[name], HTTP_ACCEPT=MULTIPART_DICOM, **headers)
        assert answer.status_code == 403, name
        assert "not download" in answer.content.decode()
    assert AuditEvent.objects.filter(action="access_denied", actor=dana).count() == 3
    assert AuditEvent.objects.filter(action="study_view", actor=dana).exists()
    # Frames are metered as the viewer's are; no copy was metered.
    assert set(UsageRecord.objects.values_list("kind", flat=True)) == {"dicomweb"}
    assert UsageRecord.objects.get().images == 1


def test_a_download_share_retrieves_and_is_metered_once(
    client: Client, bob: User, bob_token: str, gfc: Facility, dana: User
) -> None:
    shared = study_upload(client, bob_token)
    share_create(
        facility=shared.study.facility,
        created_by=bob,
        studies=[shared.study],
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
    )
    headers = bearer(_token(dana))
    for _ in range(2):  # the same retrieval twice is one delivery
        answer = client.get(_urls(shared)["study"], HTTP_ACCEPT=MULTIPART_DICOM, **headers)
        assert answer.status_code == 200
        assert _body(answer).count(b"Content-Type: application/dicom") == 4
    usage = UsageRecord.objects.get()
    assert (usage.kind, usage.images, usage.facility) == ("dicomweb", 4, gfc)
    assert usage.bytes == sum(Instance.objects.values_list("size_bytes", flat=True))
    download = AuditEvent.objects.filter(action="study_download", actor=dana)
    assert download.count() == 2
    assert download.first().actor_facility == gfc  # type: ignore[union-attr]
    # The sender reads each copy taken on the share's timeline, as for a ZIP.
    receipts = ShareEvent.objects.filter(kind=ShareEventKind.DOWNLOADED)
    assert [(r.actor_label, r.detail) for r in receipts] == [
        ("dana@gfc.example", "4 images by DICOMweb")
    ] * 2


def test_a_view_only_member_views_but_takes_no_copy(
    client: Client, ct_study: UploadedStudy, krmc: Facility
) -> None:
    watcher = User.objects.create_user(email="watcher@krmc.example", password=PASSWORD)
    Membership.objects.create(user=watcher, facility=krmc, role="viewer")
    headers = bearer(_token(watcher))
    assert _found(client, headers) == {ct_study.uid}
    assert client.get(_urls(ct_study)["metadata"], **headers).status_code == 200
    assert client.get(_urls(ct_study)["study"], **headers).status_code == 403


def test_a_facility_token_sees_that_facility_only(
    client: Client, ct_study: UploadedStudy, krmc: Facility, gfc: Facility
) -> None:
    both = User.objects.create_user(email="both@example.org", password=PASSWORD)
    Membership.objects.create(user=both, facility=krmc, role="reader")
    Membership.objects.create(user=both, facility=gfc, role="reader")
    assert _found(client, bearer(_token(both, krmc))) == {ct_study.uid}
    gfc_token = bearer(_token(both, gfc))
    assert _found(client, gfc_token) == set()
    assert client.get(_urls(ct_study)["metadata"], **gfc_token).status_code == 404


def test_a_purged_study_is_gone(client: Client, ct_study: UploadedStudy, read_token: str) -> None:
    Study.objects.filter(pk=ct_study.study.pk).update(purged_at=timezone.now())
    assert _found(client, bearer(read_token)) == set()
    assert client.get(_urls(ct_study)["metadata"], **bearer(read_token)).status_code == 404
