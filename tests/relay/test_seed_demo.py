"""`manage.py seed_demo`: the three facilities, their people, a sample study; once only."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.test import Client

from portal.models import Facility, Membership, User
from transfers.models import Study

pytestmark = pytest.mark.django_db


def test_it_loads_the_demo_once_and_prints_working_logins(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out = io.StringIO()
    call_command("seed_demo", stdout=out)
    assert set(Facility.objects.values_list("name", "has_pacs")) == {
        ("Kalispell Regional Medical Center", True),
        ("Great Falls Clinic", True),
        ("St. Luke Community Healthcare", False),
    }
    assert Membership.objects.count() == 9
    assert {m.role for m in Membership.objects.filter(facility__slug="stluke")} == {
        "admin",
        "sender",
        "reader",
    }
    study = Study.objects.get(description="CT CHEST WITHOUT CONTRAST")
    assert study.num_instances == 12
    password = re.search(r"sender@krmc\.example\s+(\S+)", out.getvalue()).group(1)  # type: ignore[union-attr]
    signed_in = Client().post(
        "/accounts/login/", {"login": "sender@krmc.example", "password": password}
    )
    assert signed_in.status_code == 302
    assert (tmp_path / "demo-logins.txt").stat().st_mode & 0o077 == 0

    again = io.StringIO()
    call_command("seed_demo", stdout=again)
    assert User.objects.count() == 10
    assert Study.objects.filter(description="CT CHEST WITHOUT CONTRAST").count() == 1
    assert password in again.getvalue()
