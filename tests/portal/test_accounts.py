"""Sign-in, API tokens on the profile page, the create_api_token command, password reset."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.test import Client

from portal.models import ApiToken, AuditEvent, hash_token
from tests.helpers import PASSWORD, client_for, read_testdata, upload

pytestmark = pytest.mark.django_db


def test_a_token_is_shown_once_stored_hashed_and_works(bob, krmc):
    client = client_for(bob)
    client.post(
        "/accounts/tokens/",
        {"name": "CT workstation", "facility": krmc.pk, "access": "write", "days": 30},
    )
    page = client.get("/accounts/profile/").content.decode()
    raw = re.search(r"<code>(rly_[A-Za-z0-9_-]+)</code>", page).group(1)  # type: ignore[union-attr]
    token = ApiToken.objects.get(user=bob)
    assert token.token_hash == hash_token(raw)
    assert raw not in str(ApiToken.objects.values_list())
    assert raw not in client.get("/accounts/profile/").content.decode()
    assert upload(Client(), read_testdata("CT_small.dcm"), token=raw).status_code == 201
    token.refresh_from_db()
    assert token.last_used_at is not None
    assert AuditEvent.objects.filter(action="token_create", actor=bob).exists()


def test_a_revoked_token_stops_working_at_once(bob, bob_token):
    token = ApiToken.objects.get(user=bob)
    client_for(bob).post(f"/accounts/tokens/{token.pk}/revoke/")
    assert upload(Client(), read_testdata("CT_small.dcm"), token=bob_token).status_code == 401


def test_nobody_revokes_someone_elses_token(bob, charlie):
    token, _ = ApiToken.issue(user=bob, name="t")
    assert client_for(charlie).post(f"/accounts/tokens/{token.pk}/revoke/").status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


def test_create_api_token_prints_a_working_token(bob):
    out = io.StringIO()
    call_command("create_api_token", "BOB@krmc.example", stdout=out)
    raw = out.getvalue().strip()
    assert raw.startswith("rly_")
    assert upload(Client(), read_testdata("CT_small.dcm"), token=raw).status_code == 201


def test_create_api_token_refuses_an_unknown_address(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No active user"):
        call_command("create_api_token", "nobody@example.org")


def test_password_reset_by_email(bob, mailoutbox):
    client = Client()
    client.post("/accounts/password/reset/", {"email": "bob@krmc.example"})
    assert len(mailoutbox) == 1
    link = re.search(r"http://[^/]+(/accounts/reset/\S+/)", mailoutbox[0].body).group(1)  # type: ignore[union-attr]
    page = client.get(link, follow=True)
    assert page.status_code == 200
    new = "a brand new passphrase 99"
    client.post(page.redirect_chain[-1][0], {"new_password1": new, "new_password2": new})
    signed_in = Client().post("/accounts/login/", {"login": "bob@krmc.example", "password": new})
    assert signed_in.status_code == 302


def test_password_reset_does_not_tell_whether_an_address_exists(db, mailoutbox):
    response = Client().post("/accounts/password/reset/", {"email": "nobody@example.org"})
    assert response.status_code == 302
    assert mailoutbox == []


def test_password_change_is_audited(bob):
    client = client_for(bob)
    new = "another long passphrase 7"
    response = client.post(
        "/accounts/password/change/",
        {"old_password": PASSWORD, "new_password1": new, "new_password2": new},
    )
    assert response.status_code == 302
    assert AuditEvent.objects.filter(action="password_change", actor=bob).exists()


def test_the_login_page_signs_in_by_email(bob):
    client = Client()
    response = client.post("/accounts/login/", {"login": "bob@krmc.example", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == "/"
