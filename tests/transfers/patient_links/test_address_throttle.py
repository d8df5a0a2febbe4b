"""One address that sends many wrong answers, to any patient links, is paused for all of them
with a 429 page; other addresses are not."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from portal.models import AuditAction, AuditEvent, User
from tests.helpers import dicom_bytes, upload
from transfers.models import Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
WRONG = {"birth_date": "2001-01-01"}
RIGHT = {"birth_date": BIRTH_DATE}


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _links(bob: User, study: Study, count: int) -> list[tuple[Share, str]]:
    links = []
    for _ in range(count):
        share, token = share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="patient",
            second_factor="birth_date",
        )
        assert token is not None
        links.append((share, token))
    return links


def _post(client: Client, token: str, data: dict[str, str]) -> Any:
    return client.post(f"/p/{token}/", data)


def test_twenty_wrong_answers_across_links_block_the_address(bob, study):
    links = _links(bob, study, 5)
    guesser = Client(REMOTE_ADDR="198.51.100.7")
    for _, token in links[:4]:
        for _ in range(5):
            assert _post(guesser, token, WRONG).status_code == 403

    # The fifth link was never guessed at, and the right answer is still refused.
    share, token = links[4]
    response = _post(guesser, token, RIGHT)
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 3000
    html = response.content.decode()
    assert "Too many wrong answers" in html and "Kalispell Regional Medical Center" in html
    assert "<form" not in html
    share.refresh_from_db()
    assert share.failed_attempts == 0  # refused before the link's own count
    assert _post(guesser, token, RIGHT).status_code == 429

    # Another address is not affected.
    patient = Client(REMOTE_ADDR="203.0.113.9")
    assert _post(patient, token, RIGHT).status_code == 302
    assert patient.get(f"/p/{token}/studies/").status_code == 200

    (lockout,) = AuditEvent.objects.filter(action=AuditAction.LOCKOUT)
    assert lockout.client_ip == "198.51.100.7"
    assert lockout.facility == study.facility
    refused = AuditEvent.objects.filter(
        action=AuditAction.PATIENT_FACTOR, detail__reason="address blocked"
    )
    assert refused.count() == 2
    assert {e.client_ip for e in refused} == {"198.51.100.7"}
    assert token not in str(list(AuditEvent.objects.values_list("detail", flat=True)))


def test_an_ipv6_client_counts_by_its_64_network(bob, study, settings):
    settings.PATIENT_LINK_ADDRESS_FAILURES = 3
    (_, token), (_, other) = _links(bob, study, 2)
    for host in ("1", "2", "3"):
        client = Client(REMOTE_ADDR=f"2001:db8:1:2::{host}")
        assert _post(client, token, WRONG).status_code == 403
    assert _post(Client(REMOTE_ADDR="2001:db8:1:2::99"), other, RIGHT).status_code == 429
    assert _post(Client(REMOTE_ADDR="2001:db8:1:3::1"), other, RIGHT).status_code == 302


def test_right_answers_and_a_few_wrong_ones_do_not_block(bob, study):
    links = _links(bob, study, 4)
    patient = Client(REMOTE_ADDR="198.51.100.7")
    for _, token in links:
        for _ in range(4):
            assert _post(patient, token, WRONG).status_code == 403
        assert _post(patient, token, RIGHT).status_code == 302
    assert not AuditEvent.objects.filter(action=AuditAction.LOCKOUT).exists()
