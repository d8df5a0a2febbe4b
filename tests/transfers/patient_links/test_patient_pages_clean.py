"""Issue 15, finding 2: no patient page shows template source text (a `{# ... #}` comment spread
over two lines is not a comment to Django and was printed at the top of every patient page).

Every page a patient can reach is opened as the patient would open it, and no template file
has a `{#` that is not closed on the same line, which is how the defect came about."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import Client

from portal.models import User
from tests.helpers import dicom_bytes, upload
from transfers.models import Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
TEMPLATE_SOURCE = re.compile(r"\{#|#\}|\{%|%\}|\{\{|\}\}")


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _token(bob: User, study: Study) -> str:
    _, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="birth_date",
        can_download=True,
    )
    assert token is not None
    return token


def _assert_clean(html: str, page: str) -> None:
    leftover = TEMPLATE_SOURCE.search(html)
    assert leftover is None, f"{page} shows template source: {html[leftover.start() - 80 :][:200]}"


def test_it_shows_no_template_text_on_any_patient_page(bob, study, settings):
    settings.PATIENT_LINK_ADDRESS_FAILURES = 2
    token = _token(bob, study)
    patient = Client()

    pages = {}
    pages["second factor"] = patient.get(f"/p/{token}/")
    pages["wrong answer"] = patient.post(f"/p/{token}/", {"birth_date": "2001-01-01"})
    assert patient.post(f"/p/{token}/", {"birth_date": BIRTH_DATE}).status_code == 302
    pages["studies"] = patient.get(f"/p/{token}/studies/")
    pages["viewer"] = patient.get(f"/p/{token}/studies/{study.uuid}/view/")
    pages["unknown link"] = Client().get("/p/not-a-real-token/")
    guesser = Client(REMOTE_ADDR="198.51.100.7")
    for _ in range(2):
        guesser.post(f"/p/{token}/", {"birth_date": "2001-01-01"})
    pages["address paused"] = guesser.post(f"/p/{token}/", {"birth_date": BIRTH_DATE})

    expected = {
        "second factor": 200,
        "wrong answer": 403,
        "studies": 200,
        "viewer": 200,
        "unknown link": 404,
        "address paused": 429,
    }
    assert {name: page.status_code for name, page in pages.items()} == expected
    for name, page in pages.items():
        html = page.content.decode()
        assert "<html" in html, name
        _assert_clean(html, name)
    # The patient's pages are the ones built on patient_base.html, whose comment it was.
    assert "Images from Kalispell Regional Medical Center" in pages["studies"].content.decode()


def test_no_template_has_a_comment_left_open_on_its_line():
    engines: list[dict[str, Any]] = django_settings.TEMPLATES
    roots = [Path(d) for engine in engines for d in engine.get("DIRS", [])]
    files = [f for root in roots for f in root.rglob("*") if f.suffix in {".html", ".txt"}]
    assert len(files) > 20
    open_comments = []
    for template in files:
        for number, line in enumerate(template.read_text().splitlines(), 1):
            # Django's {# #} comment ends on its own line; anything longer is {% comment %}.
            if re.search(r"\{#(?!.*#\})", line) or re.search(r"^(?:(?!\{#).)*#\}", line):
                open_comments.append(f"{template}:{number}: {line.strip()}")
    assert open_comments == []
