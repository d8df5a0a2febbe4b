"""Billing fixtures: the billing settings, a staff operator, studies and shares to deliver."""

from __future__ import annotations

from typing import Any

import pytest

from portal.models import Facility, User
from tests.billing.factories import make_share, make_study
from transfers.models import Share, ShareKind, Study


@pytest.fixture(autouse=True)
def _billing_settings(settings: Any) -> None:
    settings.RELAY_BILLING_TIME_ZONE = "America/Denver"
    settings.RELAY_BILL_PATIENT_LINKS_TO = "sender"
    settings.RELAY_COURIER_CD_PRICE = "11.00"
    settings.RELAY_BILLING_CURRENCY = "USD"


@pytest.fixture
def operator(db: None) -> User:
    return User.objects.create_user(
        email="operator@relay.example", password="x" * 12, is_staff=True
    )


@pytest.fixture
def study(krmc: Facility, bob: User) -> Study:
    return make_study(krmc)


@pytest.fixture
def share_to_gfc(study: Study, bob: User, gfc: Facility) -> Share:
    """Kalispell shares a study with Great Falls (whose members' deliveries Great Falls pays)."""
    return make_share(study, by=bob, kind=ShareKind.FACILITY, recipient_facility=gfc)
