"""Facility admins invite members by e-mail; the link creates the account or adds the membership."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from portal.models import AuditEvent, Invitation, Membership, User
from tests.helpers import PASSWORD, client_for

pytestmark = pytest.mark.django_db


def _invite(alice: User, email: str, role: str, mailoutbox: list, capture) -> str:
    # The e-mail is queued when the transaction commits.
    with capture(execute=True):
        response = client_for(alice).post(
            "/facilities/krmc/members/", {"email": email, "role": role}
        )
    assert response.status_code == 302
    message = mailoutbox[-1]
    assert message.to == [email]
    link = re.search(r"http://\S+/invitations/(\S+)/", message.body)
    assert link is not None
    return f"/invitations/{link.group(1)}/"


def test_a_new_person_accepts_and_gets_an_account(
    alice, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        client_for(alice).post(
            "/facilities/krmc/members/", {"email": "dr.new@clinic.example", "role": "reader"}
        )
    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert "Kalispell Regional Medical Center" in message.subject
    path = re.search(r"/invitations/\S+/", message.body).group(0)  # type: ignore[union-attr]
    assert message.alternatives and path in message.alternatives[0][0]
    # Nothing secret is stored: the link's token is kept only as a hash.
    token = path.split("/")[2]
    assert not Invitation.objects.filter(token_hash=token).exists()

    client = Client()
    page = client.get(path)
    assert page.status_code == 200
    assert b"Create account and join" in page.content
    response = client.post(
        path, {"full_name": "Dr New", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert response.status_code == 302
    user = User.objects.get(email="dr.new@clinic.example")
    assert Membership.objects.get(user=user).role == "reader"
    assert client.get("/studies/").status_code == 200  # signed in
    assert AuditEvent.objects.filter(action="member_join", actor=user).exists()
    # The link works once.
    assert Client().get(path).status_code == 404


def test_an_existing_user_signs_in_and_accepts(
    alice, charlie, mailoutbox, django_capture_on_commit_callbacks
):
    path = _invite(
        alice, "charlie@gfc.example", "sender", mailoutbox, django_capture_on_commit_callbacks
    )
    response = Client().get(path)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    client = client_for(charlie)
    assert client.post(path).status_code == 302
    assert Membership.objects.get(user=charlie, facility__slug="krmc").role == "sender"


def test_someone_else_cannot_use_the_link(
    alice, bob, mailoutbox, django_capture_on_commit_callbacks
):
    path = _invite(
        alice, "someone@else.example", "admin", mailoutbox, django_capture_on_commit_callbacks
    )
    client_for(bob).post(path)
    assert Membership.objects.get(user=bob).role == "sender"
    assert Invitation.objects.get().accepted_at is None


def test_an_expired_invitation_does_not_work(alice, mailoutbox, django_capture_on_commit_callbacks):
    path = _invite(
        alice, "late@clinic.example", "reader", mailoutbox, django_capture_on_commit_callbacks
    )
    Invitation.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    response = Client().post(
        path, {"full_name": "Late", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert response.status_code == 404
    assert not User.objects.filter(email="late@clinic.example").exists()


def test_a_withdrawn_invitation_does_not_work(
    alice, mailoutbox, django_capture_on_commit_callbacks
):
    path = _invite(
        alice, "gone@clinic.example", "reader", mailoutbox, django_capture_on_commit_callbacks
    )
    invitation = Invitation.objects.get()
    client_for(alice).post(f"/facilities/krmc/invitations/{invitation.pk}/revoke/")
    assert Client().get(path).status_code == 404


def test_inviting_a_member_again_is_refused(alice, bob, mailoutbox):
    response = client_for(alice).post(
        "/facilities/krmc/members/", {"email": "bob@krmc.example", "role": "admin"}, follow=True
    )
    assert b"already a member" in response.content
    assert not Invitation.objects.exists()


def test_the_admin_changes_roles_but_keeps_one_admin(alice, bob):
    client = client_for(alice)
    bob_m = Membership.objects.get(user=bob)
    client.post(f"/facilities/krmc/members/{bob_m.pk}/role/", {"role": "reader"})
    assert Membership.objects.get(user=bob).role == "reader"
    alice_m = Membership.objects.get(user=alice)
    response = client.post(f"/facilities/krmc/members/{alice_m.pk}/remove/", follow=True)
    assert b"at least one admin" in response.content
    assert Membership.objects.filter(pk=alice_m.pk).exists()
    client.post(f"/facilities/krmc/members/{bob_m.pk}/remove/")
    assert not Membership.objects.filter(pk=bob_m.pk).exists()
    assert AuditEvent.objects.filter(action="member_remove", facility__slug="krmc").count() == 1


def test_withdrawing_an_invitation_is_audited_once(
    alice, mailoutbox, django_capture_on_commit_callbacks
):
    _invite(alice, "gone@clinic.example", "reader", mailoutbox, django_capture_on_commit_callbacks)
    invitation = Invitation.objects.get()
    client = client_for(alice)
    client.post(f"/facilities/krmc/invitations/{invitation.pk}/revoke/")
    client.post(f"/facilities/krmc/invitations/{invitation.pk}/revoke/")
    event = AuditEvent.objects.get(action="invitation_revoke")
    assert event.actor == alice
    assert event.detail == {"email": "gone@clinic.example", "role": "reader"}
