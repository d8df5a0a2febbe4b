""" "Open in advanced viewer" on the study page and in the inbox: shown to signed-in users who
may view the study, when OHIF is installed, beside Relay's own "View images" (when it is not,
the study page's button says how to add it); never on a patient's pages."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from portal.models import Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

BUTTON = "Open in advanced viewer"
BIRTH_DATE = "1961-04-12"


@pytest.fixture
def study(bob: User, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(Client(), data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _share(study: Study, bob: User, gfc: Facility, *, can_view: bool) -> None:
    share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
        can_view=can_view,
        can_download=True,
    )


def _link(study: Study) -> str:
    return f'href="/ohif/viewer?StudyInstanceUIDs={study.study_instance_uid}"'


def test_the_owner_and_a_recipient_get_it_when_installed(
    ohif_site: Path, study: Study, bob: User, dana: User, gfc: Facility
) -> None:
    _share(study, bob, gfc, can_view=True)
    for user in (bob, dana):
        page = client_for(user).get(f"/studies/{study.uuid}/").content.decode()
        assert BUTTON in page and _link(study) in page, user
        assert "View images" in page  # Relay's own viewer stays
    inbox = client_for(dana).get("/inbox/").content.decode()
    assert BUTTON in inbox and _link(study) in inbox


def test_without_ohif_the_button_says_how_to_add_it(
    study: Study, bob: User, dana: User, gfc: Facility
) -> None:
    _share(study, bob, gfc, can_view=True)
    client = client_for(bob)
    page = client.get(f"/studies/{study.uuid}/").content.decode()
    assert BUTTON not in page and "StudyInstanceUIDs" not in page
    assert 'href="/ohif/viewer"' in page and "Advanced viewer: how to add it" in page
    how = client.get("/ohif/viewer").content.decode()
    assert "The advanced viewer (OHIF) is not installed" in how
    assert "manage.py ohif_install" in how and "apt-get install nodejs npm" in how
    inbox = client_for(dana).get("/inbox/").content.decode()
    assert "View images" in inbox and BUTTON not in inbox


def test_a_download_only_recipient_does_not_get_it(
    ohif_site: Path, study: Study, bob: User, dana: User, gfc: Facility
) -> None:
    _share(study, bob, gfc, can_view=False)
    page = client_for(dana).get(f"/studies/{study.uuid}/")
    assert page.status_code == 200
    assert BUTTON not in page.content.decode()
    inbox = client_for(dana).get("/inbox/").content.decode()
    assert "Download (ZIP)" in inbox and BUTTON not in inbox


def test_an_outsider_and_a_patient_do_not_get_it(
    ohif_site: Path, study: Study, bob: User, charlie: User
) -> None:
    assert client_for(charlie).get(f"/studies/{study.uuid}/").status_code == 404
    _, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="birth_date",
    )
    patient = Client()
    assert patient.post(f"/p/{token}/", {"birth_date": BIRTH_DATE}).status_code == 302
    page = patient.get(f"/p/{token}/studies/")
    assert page.status_code == 200
    assert "View images" in page.content.decode()
    assert BUTTON not in page.content.decode() and "/ohif/" not in page.content.decode()
    # ... and the viewer itself wants a signed-in user, which a patient link is not.
    assert patient.get("/ohif/viewer").status_code == 302
