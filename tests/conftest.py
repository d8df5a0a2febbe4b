"""Shared fixtures: personas, a private image store per test, and DICOM files to upload.

Personas (after healthchecks): alice is the admin of Kalispell, bob a sender there, carol a reader
there; charlie is a sender at Great Falls, an outsider to everything of Kalispell's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from portal.models import ApiToken, Facility, Membership, User
from tests.helpers import PASSWORD


@pytest.fixture(autouse=True)
def _private_storage(settings: Any, tmp_path: Path) -> Path:
    media = tmp_path / "media"
    storages = {key: dict(value) for key, value in settings.STORAGES.items()}
    if storages["default"]["BACKEND"].endswith("FileSystemStorage"):
        storages["default"]["OPTIONS"] = {
            **storages["default"].get("OPTIONS", {}),
            "location": str(media),
        }
    settings.STORAGES = storages
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    return media


@pytest.fixture(autouse=True)
def _eager_celery(settings: Any) -> None:
    from relay.celery import app

    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True


@pytest.fixture
def krmc(db: None) -> Facility:
    return Facility.objects.create(
        name="Kalispell Regional Medical Center",
        slug="krmc",
        city="Kalispell",
        ae_title="KRMC",
        has_pacs=True,
        listed=True,
    )


@pytest.fixture
def gfc(db: None) -> Facility:
    return Facility.objects.create(
        name="Great Falls Clinic",
        slug="gfc",
        city="Great Falls",
        ae_title="GFC",
        has_pacs=True,
        listed=True,
    )


def _person(email: str, facility: Facility, role: str) -> User:
    user = User.objects.create_user(
        email=email, password=PASSWORD, full_name=email.split("@")[0].title()
    )
    Membership.objects.create(user=user, facility=facility, role=role)
    return user


@pytest.fixture
def alice(krmc: Facility) -> User:
    return _person("alice@krmc.example", krmc, "admin")


@pytest.fixture
def bob(krmc: Facility) -> User:
    return _person("bob@krmc.example", krmc, "sender")


@pytest.fixture
def carol(krmc: Facility) -> User:
    return _person("carol@krmc.example", krmc, "reader")


@pytest.fixture
def charlie(gfc: Facility) -> User:
    return _person("charlie@gfc.example", gfc, "sender")


@pytest.fixture
def dana(gfc: Facility) -> User:
    """A reader at Great Falls, the recipient facility of most shares in the tests."""
    return _person("dana@gfc.example", gfc, "reader")


@pytest.fixture
def bob_token(bob: User) -> str:
    return ApiToken.issue(user=bob, name="test")[1]
