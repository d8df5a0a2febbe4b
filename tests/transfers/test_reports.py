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
