"""Radiology reports: attached by the sender, read and downloaded by the recipient of a share."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from portal.models import AuditEvent
from tests.helpers import client_for, read_testdata, upload
from transfers.models import Report, Study, StudyStatus
from transfers.sharing.services import share_create, share_revoke

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest.fixture
def study(client, bob_token) -> Study:
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def test_the_sender_attaches_a_typed_report_shown_escaped(bob, study):
    text = "FINDINGS: No acute abnormality.\n<script>alert(1)</script>"
    response = client_for(bob).post(f"/studies/{study.uuid}/reports/", {"text": text})
    assert response.status_code == 302
    page = client_for(bob).get(f"/studies/{study.uuid}/").content.decode()
    assert "No acute abnormality." in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_a_pdf_report_reaches_the_recipient_and_is_audited(bob, charlie, study, gfc):
    pdf = SimpleUploadedFile("CT chest report.pdf", PDF, content_type="application/pdf")
    client_for(bob).post(f"/studies/{study.uuid}/reports/", {"pdf": pdf})
    report = Report.objects.get()
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
    )
    reader = client_for(charlie)
    assert "CT chest report.pdf" in reader.get(f"/studies/{study.uuid}/").content.decode()
    response = reader.get(f"/studies/{study.uuid}/reports/{report.uuid}/")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    # Saved under a name that says when, not the name it was uploaded as (often the patient's).
    disposition = response["Content-Disposition"]
    assert disposition.startswith("attachment") and "chest" not in disposition
    assert (
        f"report-{timezone.localtime(report.created_at):%Y%m%d}-{str(report.uuid)[:8]}.pdf"
        in disposition
    )
    assert b"".join(response.streaming_content) == PDF
    assert AuditEvent.objects.filter(action="report_view", actor=charlie).exists()
    share_revoke(share=share, by=bob)
    assert reader.get(f"/studies/{study.uuid}/reports/{report.uuid}/").status_code == 404


def test_a_report_can_come_with_the_share(bob, study, gfc):
    response = client_for(bob).post(
        "/share/",
        {
            "study": [str(study.uuid)],
            "kind": "facility",
            "recipient_facility": gfc.pk,
            "expires_on": (timezone.localdate() + timedelta(days=5)).isoformat(),
            "can_view": "on",
            "report_text": "IMPRESSION: Stable.",
        },
    )
    assert response.status_code == 302
    assert Report.objects.get(study=study).text == "IMPRESSION: Stable."


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"pdf": SimpleUploadedFile("x.pdf", b"MZ not a pdf at all")}, "not a PDF"),
        ({"text": ""}, "Type the report"),
    ],
)
def test_bad_reports_are_refused(bob, study, payload, error):
    response = client_for(bob).post(f"/studies/{study.uuid}/reports/", payload, follow=True)
    assert error in response.content.decode()
    assert not Report.objects.exists()


@pytest.mark.parametrize("persona", ["carol", "charlie"])
def test_only_senders_of_the_owning_facility_attach_reports(request, persona, study):
    user = request.getfixturevalue(persona)
    response = client_for(user).post(f"/studies/{study.uuid}/reports/", {"text": "fake report"})
    assert response.status_code == 404
    assert not Report.objects.exists()


def _zip_names(response) -> list[str]:  # type: ignore[no-untyped-def]
    import io
    import zipfile

    return zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist()


def test_a_report_sent_with_one_share_reaches_that_recipient_only(bob, charlie, study, gfc):
    """An ER physician's preliminary read, sent to Great Falls, reaches neither another
    facility the study is shared with nor the patient."""
    from portal.models import Facility, Membership, User
    from tests.helpers import PASSWORD
    from transfers.models import Share

    stluke = Facility.objects.create(name="St. Luke", slug="stluke")
    eve = User.objects.create_user(email="eve@stluke.example", password=PASSWORD)
    Membership.objects.create(user=eve, facility=stluke, role="reader")
    expires = (timezone.localdate() + timedelta(days=5)).isoformat()
    response = client_for(bob).post(
        "/share/",
        {
            "study": [str(study.uuid)],
            "kind": "facility",
            "recipient_facility": gfc.pk,
            "expires_on": expires,
            "can_view": "on",
            "can_download": "on",
            "report_text": "PRELIMINARY READ: suspected fracture.",
        },
    )
    assert response.status_code == 302
    report = Report.objects.get()
    assert report.share == Share.objects.get() and not report.for_patient
    share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=stluke,
        can_download=True,
    )
    _, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="pin",
        pin="482915",
        can_download=True,
    )

    report_url = f"/studies/{study.uuid}/reports/{report.uuid}/"
    # Great Falls reads it on the study page, in the viewer, as a download and in the ZIP.
    gfc_reader = client_for(charlie)
    assert "PRELIMINARY READ" in gfc_reader.get(f"/studies/{study.uuid}/").content.decode()
    assert "PRELIMINARY READ" in gfc_reader.get(f"/studies/{study.uuid}/view/").content.decode()
    assert gfc_reader.get(report_url).status_code == 200
    assert any(
        n.startswith("REPORT/")
        for n in _zip_names(gfc_reader.get(f"/studies/{study.uuid}/download/"))
    )

    # St. Luke, which received the same study, sees no trace of it.
    other = client_for(eve)
    assert "PRELIMINARY READ" not in other.get(f"/studies/{study.uuid}/").content.decode()
    assert "PRELIMINARY READ" not in other.get(f"/studies/{study.uuid}/view/").content.decode()
    assert other.get(report_url).status_code == 404
    names = _zip_names(other.get(f"/studies/{study.uuid}/download/"))
    assert not any(n.startswith("REPORT/") for n in names)

    # Nor does the patient.
    from django.test import Client

    patient = Client()
    patient.post(f"/p/{token}/", {"pin": "482915"})
    page = patient.get(f"/p/{token}/studies/").content.decode()
    assert str(report.uuid) not in page
    assert patient.get(f"/p/{token}/studies/{study.uuid}/reports/{report.uuid}/").status_code == 404
    assert (
        "PRELIMINARY READ"
        not in patient.get(f"/p/{token}/studies/{study.uuid}/view/").content.decode()
    )
    names = _zip_names(patient.get(f"/p/{token}/studies/{study.uuid}/download/"))
    assert not any(n.startswith("REPORT/") for n in names)


def test_a_report_for_everyone_reaches_patients_only_when_marked(bob, study):
    from django.test import Client

    client = client_for(bob)
    client.post(f"/studies/{study.uuid}/reports/", {"text": "FINAL: for the radiologists."})
    client.post(
        f"/studies/{study.uuid}/reports/", {"text": "FINAL: for the patient.", "for_patient": "on"}
    )
    _, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="pin",
        pin="482915",
    )
    patient = Client()
    patient.post(f"/p/{token}/", {"pin": "482915"})
    viewer = patient.get(f"/p/{token}/studies/{study.uuid}/view/").content.decode()
    assert "FINAL: for the patient." in viewer
    assert "FINAL: for the radiologists." not in viewer
    # The sending facility reads both, each with who it is for.
    page = client.get(f"/studies/{study.uuid}/").content.decode()
    assert page.count("· for every recipient") == 2 and page.count("patients too") == 1


def test_a_report_sent_with_a_patient_link_is_for_that_patient(bob, study):
    response = client_for(bob).post(
        "/share/",
        {
            "study": [str(study.uuid)],
            "kind": "patient",
            "second_factor": "pin",
            "pin": "482915",
            "expires_on": (timezone.localdate() + timedelta(days=5)).isoformat(),
            "can_view": "on",
            "report_text": "Your scan is normal.",
        },
    )
    assert response.status_code == 302
    from transfers.models import Share

    report = Report.objects.get()
    assert report.share == Share.objects.get() and report.for_patient
