"""Shared fixtures: personas, a private image store per test, and DICOM files to upload.

Personas (after healthchecks): alice is the admin of Kalispell, bob a sender there, carol a reader
there; charlie is a sender at Great Falls, an outsider to everything of Kalispell's.
"""

from __future__ import annotations

import uuid
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
def _no_ohif(settings: Any, tmp_path: Path) -> None:
    """Tests see no OHIF install (make install may have put one under var/); the OHIF tests
    point RELAY_OHIF_DIR at theirs."""
    settings.RELAY_OHIF_DIR = tmp_path / "ohif"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    # A PBKDF2 hash costs seconds on a loaded CI machine and every persona has a password; the
    # hasher's strength is Django's business, not what these tests check.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_cache(settings: Any) -> None:
    # Rate limits and patient-link address blocks count in the cache, and every test client comes
    # from 127.0.0.1: each test starts with no counts (a new prefix, so that a Redis shared with
    # other runs is never cleared).
    prefix = f"test-{uuid.uuid4().hex}"
    settings.CACHES = {
        alias: {**config, "KEY_PREFIX": prefix} for alias, config in settings.CACHES.items()
    }


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


@pytest.fixture
def admin_client(admin_user: User) -> Any:
    """pytest-django's admin client, signed in as staff sign in: with their second factor."""
    from tests.helpers import client_for

    return client_for(admin_user)
