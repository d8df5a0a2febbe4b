"""The issue's access rules as one table: every page and download that touches a shared study,
against every persona.

Only the uploader, a colleague at the same facility, a reader at the recipient facility and the
patient with a verified second factor get in. Everyone else gets a 404, the login page or the
second-factor page, and never the data: no patient name, no DICOM bytes.
"""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from portal.models import Facility, Membership, User
from tests.helpers import PASSWORD, client_for, dicom_bytes, upload
from transfers.models import Share, Study, StudyStatus
from transfers.reports import report_attach
from transfers.sharing.services import share_create, share_revoke

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
PATIENT_NAME = "SECRET^PATIENT"
IN = "in"
LOGIN = "login"
FACTOR = "factor"

PERSONAS: dict[str, str] = {
    "uploader": IN,
    "colleague": IN,
    "recipient_reader": IN,
    "unrelated_reader": 404,  # type: ignore[dict-item]
    "patient_verified": IN,
    "patient_wrong_factor": FACTOR,
    "patient_expired_link": 404,  # type: ignore[dict-item]
    "patient_revoked_link": 404,  # type: ignore[dict-item]
    "anonymous": LOGIN,
}
RESOURCES = ["page", "zip", "report"]


class World:
    """One study of Kalispell's with a report, shared with Great Falls and by three patient links."""

    def __init__(self, client: Client, bob: User, bob_token: str, carol: User, gfc: Facility):
        for n in range(2):
            data = dicom_bytes(
                "CT_small.dcm",
                PatientName=PATIENT_NAME,
                PatientBirthDate=BIRTH_DATE.replace("-", ""),
                StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
                InstanceNumber=n + 1,
            )
            assert upload(client, data, token=bob_token).status_code == 201
        Study.objects.update(status=StudyStatus.COMPLETE)
        self.study = Study.objects.get()
        self.report = report_attach(
            study=self.study, by=bob, text="No acute findings.", for_patient=True
        )
        share_create(
            facility=self.study.facility,
            created_by=bob,
            studies=[self.study],
            kind="facility",
            recipient_facility=gfc,
            can_download=True,
        )
        self.bob, self.carol = bob, carol
        self.dana = _user("dana@gfc.example", gfc, "reader")
        stluke = Facility.objects.create(name="St. Luke", slug="stluke")
        self.erin = _user("erin@stluke.example", stluke, "reader")
        self.links: dict[str, tuple[Share, str]] = {}
        for name in ("verified", "wrong", "expired", "revoked"):
            share, token = share_create(
                facility=self.study.facility,
                created_by=bob,
                studies=[self.study],
                kind="patient",
                second_factor="birth_date",
                can_download=True,
            )
            assert token is not None
            self.links[name] = (share, token)

    def client_and_urls(self, persona: str) -> tuple[Client, dict[str, str]]:
        study, report = self.study.uuid, self.report.uuid
        users = {
            "page": f"/studies/{study}/",
            "zip": f"/studies/{study}/download/",
            "report": f"/studies/{study}/reports/{report}/",
        }
        by_user = {
            "uploader": self.bob,
            "colleague": self.carol,
            "recipient_reader": self.dana,
            "unrelated_reader": self.erin,
        }
        if persona in by_user:
            return client_for(by_user[persona]), users
        if persona == "anonymous":
            return Client(), users
        link = {
            "patient_verified": "verified",
            "patient_wrong_factor": "wrong",
            "patient_expired_link": "expired",
            "patient_revoked_link": "revoked",
        }[persona]
        share, token = self.links[link]
        client = Client()
        answer = "1999-01-01" if link == "wrong" else BIRTH_DATE
        client.post(f"/p/{token}/", {"birth_date": answer})
        if link == "expired":
            Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() - timedelta(1))
        if link == "revoked":
            share_revoke(share=share, by=self.bob)
        patients = {
            "page": f"/p/{token}/studies/",
            "zip": f"/p/{token}/studies/{study}/download/",
            "report": f"/p/{token}/studies/{study}/reports/{report}/",
        }
        return client, patients


def _user(email: str, facility: Facility, role: str) -> User:
    user = User.objects.create_user(email=email, password=PASSWORD)
    Membership.objects.create(user=user, facility=facility, role=role)
    return user


@pytest.fixture
def world(client: Client, bob: User, bob_token: str, carol: User, gfc: Facility) -> World:
    return World(client, bob, bob_token, carol, gfc)


def _body(response: Any) -> bytes:
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return bytes(response.content)


@pytest.mark.parametrize("resource", RESOURCES)
@pytest.mark.parametrize("persona", list(PERSONAS))
def test_access(world: World, persona: str, resource: str) -> None:
    client, urls = world.client_and_urls(persona)
    response = client.get(urls[resource])
    body = _body(response)
    expected = PERSONAS[persona]

    if expected == IN:
        assert response.status_code == 200
        if resource == "page":
            assert b"SECRET" in body
        elif resource == "zip":
            names = zipfile.ZipFile(io.BytesIO(body)).namelist()
            assert "DICOMDIR" in names
        else:
            assert b"No acute findings." in body
        return

    if expected == LOGIN:
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    elif expected == FACTOR:
        # The page sends them back to the second factor; the downloads do not exist for them.
        if resource == "page":
            assert response.status_code == 302
            assert "/studies/" not in response["Location"]
        else:
            assert response.status_code == 404
    else:
        assert response.status_code == expected
    assert b"SECRET" not in body
    assert b"DICM" not in body
    assert b"No acute findings." not in body
