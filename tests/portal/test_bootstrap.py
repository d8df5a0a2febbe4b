"""A new installation gets its first operator and facility from `manage.py bootstrap` (issue 18:
they existed only through seed_demo, whose accounts and passwords are public)."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from portal.models import AuditEvent, Facility, Membership, Role, User

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple 7"


def _bootstrap(monkeypatch: pytest.MonkeyPatch, password: str = PASSWORD, **options: str) -> None:
    monkeypatch.setenv("RELAY_BOOTSTRAP_PASSWORD", password)
    call_command(
        "bootstrap",
        email=options.get("email", "it.lead@stluke.example"),
        facility=options.get("facility", "St. Luke Community Healthcare"),
    )


def test_the_first_operator_signs_in_and_is_asked_for_a_second_factor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _bootstrap(monkeypatch)

    user = User.objects.get(email="it.lead@stluke.example")
    assert user.is_staff and user.is_superuser
    facility = Facility.objects.get(slug="st-luke-community-healthcare")
    assert Membership.objects.get(user=user).role == Role.ADMIN
    assert Membership.objects.get(user=user).facility == facility
    event = AuditEvent.objects.get(action="member_join")
    assert (event.actor, event.facility, event.detail["by"]) == (
        user,
        facility,
        "manage.py bootstrap",
    )

    client = Client()
    answer = client.post("/accounts/login/", {"login": user.email, "password": PASSWORD})
    assert answer.status_code == 302
    # Staff must set up a second factor before anything else (as tests/portal/
    # test_signin_security.py shows for every staff account).
    assert client.get("/")["Location"] == "/accounts/2fa/"


def test_it_runs_once_and_refuses_weak_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CommandError, match="Nothing was created"):
        _bootstrap(monkeypatch, password="password")
    assert not User.objects.exists() and not Facility.objects.exists()

    _bootstrap(monkeypatch)
    with pytest.raises(CommandError, match="staff account already"):
        _bootstrap(monkeypatch, email="someone.else@stluke.example", facility="Other")
    assert User.objects.count() == 1 and Facility.objects.count() == 1


def test_without_a_terminal_or_the_variable_it_asks_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RELAY_BOOTSTRAP_PASSWORD", raising=False)
    with pytest.raises(CommandError, match="RELAY_BOOTSTRAP_PASSWORD"):
        call_command("bootstrap", email="it.lead@stluke.example", facility="St. Luke")
    assert not User.objects.exists()
