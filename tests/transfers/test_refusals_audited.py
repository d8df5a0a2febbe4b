"""Every refused look at a study is on the record, where the holding facility's admin reads it;
password resets, asked and done, too."""

from __future__ import annotations

import re
import uuid

import pytest
from django.test import Client

from portal.models import AuditAction, AuditEvent, User
from tests.helpers import client_for, read_testdata, upload
from transfers.models import Study, StudyStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(client, bob_token) -> Study:  # type: ignore[no-untyped-def]
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def test_an_outsiders_every_attempt_is_audited_for_the_holder(
    charlie: User, alice: User, study: Study
) -> None:
    outsider = client_for(charlie)
    paths = [
        f"/studies/{study.uuid}/",
        f"/studies/{study.uuid}/view/",
        f"/studies/{study.uuid}/download/",
        f"/studies/{study.uuid}/view/study.json",
    ]
    for path in paths:
        assert outsider.get(path).status_code == 404, path
    refused = AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED)
    assert refused.count() == len(paths)
    for event in refused:
        assert event.actor == charlie and event.outcome == "failure"
        assert event.facility == study.facility
        assert event.study_instance_uid == study.study_instance_uid
    log = client_for(alice).get("/facilities/krmc/audit/").content.decode()
    assert "Refused access" in log and "charlie@gfc.example" in log


def test_a_guessed_study_and_a_guessed_link_are_audited_without_the_token(
    charlie: User, study: Study
) -> None:
    ghost = uuid.uuid4()
    assert client_for(charlie).get(f"/studies/{ghost}/view/").status_code == 404
    event = AuditEvent.objects.get(action=AuditAction.ACCESS_DENIED)
    assert event.facility is None and event.detail["study"] == str(ghost)
    token = "guessed-token-0123456789abcdefghijkl"
    assert Client().get(f"/p/{token}/studies/{study.uuid}/view/").status_code == 404
    assert AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED).count() == 2
    assert token not in str(list(AuditEvent.objects.values_list("detail", flat=True)))


def test_a_password_reset_is_audited_asked_and_done(bob: User, mailoutbox) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    client.post("/accounts/password/reset/", {"email": "bob@krmc.example"})
    client.post("/accounts/password/reset/", {"email": "nobody@example.org"})
    asked = list(AuditEvent.objects.filter(action=AuditAction.PASSWORD_RESET_ASK).order_by("id"))
    assert [e.detail["known"] for e in asked] == [True, False]
    assert asked[0].actor == bob and asked[0].facility is not None
    (message,) = mailoutbox
    link = re.search(r"/accounts/reset/\S+/", message.body).group(0)  # type: ignore[union-attr]
    form = client.get(link, follow=True)
    new = "a-new-long-passphrase-42"
    client.post(form.redirect_chain[-1][0], {"new_password1": new, "new_password2": new})
    done = AuditEvent.objects.get(action=AuditAction.PASSWORD_RESET)
    assert done.actor == bob
