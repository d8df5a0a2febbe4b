"""Session idle timeout and absolute lifetime (portal.middleware.SessionTimeoutMiddleware) and
the session's status ping.

Time moves forward by moving the session's stored timestamps back, as a clock would leave them;
nothing here waits.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client

from portal.middleware import (
    ACTIVE_AT,
    PATIENT_SESSION_KEY,
    SIGNED_IN_AT,
    SessionTimeoutMiddleware,
)
from portal.models import ApiToken, AuditAction, AuditEvent, User
from tests.helpers import client_for, dicom_bytes, read_testdata, upload
from transfers.access import PATIENT_SESSION_KEY as TRANSFERS_PATIENT_SESSION_KEY
from transfers.models import Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

MIDDLEWARE = f"{SessionTimeoutMiddleware.__module__}.{SessionTimeoutMiddleware.__name__}"
MINUTE = 60
HOUR = 60 * MINUTE
PING = "/accounts/session/ping/"
FETCH = {"Accept": "application/json", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}


@pytest.fixture(autouse=True)
def _timeout_middleware(settings: Any) -> None:
    """The middleware where relay/settings.py puts it (after the messages), also while a
    settings file without it is in use."""
    if MIDDLEWARE not in settings.MIDDLEWARE:
        middleware = list(settings.MIDDLEWARE)
        at = middleware.index("django.contrib.messages.middleware.MessageMiddleware") + 1
        settings.MIDDLEWARE = [*middleware[:at], MIDDLEWARE, *middleware[at:]]
    # The defaults, whatever the environment running the tests says.
    settings.RELAY_SESSION_IDLE_MINUTES = 15
    settings.RELAY_SESSION_IDLE_SECONDS = None
    settings.RELAY_SESSION_MAX_HOURS = 12
    settings.RELAY_SESSION_WARN_SECONDS = 120


def _signed_in(user: User) -> Client:
    client = client_for(user)
    assert client.get("/studies/").status_code == 200
    return client


def _rewind(client: Client, *, active: float = 0, signed_in: float = 0) -> None:
    """Move the session's clock: its last activity `active` seconds, its sign-in `signed_in`
    seconds further into the past."""
    session = client.session
    session[ACTIVE_AT] = session[ACTIVE_AT] - active
    session[SIGNED_IN_AT] = session[SIGNED_IN_AT] - signed_in
    session.save()


def _expired_events() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=AuditAction.SESSION_EXPIRED))


def test_the_patient_session_key_is_the_one_transfers_writes():
    # portal may not import transfers, so the middleware repeats the name.
    assert PATIENT_SESSION_KEY == TRANSFERS_PATIENT_SESSION_KEY


def test_it_signs_out_a_session_idle_past_the_limit(bob):
    client = _signed_in(bob)
    _rewind(client, active=15 * MINUTE + 1)

    # The search terms stay out of the sign-in page's address.
    response = client.get("/studies/?q=Smith")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/studies/"
    assert "Smith" not in response["Location"]

    page = client.get(response["Location"])
    assert "Signed out after 15 minutes without activity." in page.content.decode()
    assert "_auth_user_id" not in client.session
    assert client.get("/studies/").status_code == 302  # login_required: signed out for good
    (event,) = _expired_events()
    assert event.actor == bob
    assert event.detail == {"reason": "idle"}
    assert AuditEvent.objects.filter(action=AuditAction.LOGOUT, actor=bob).exists()


def test_activity_within_the_limit_keeps_the_session(bob):
    client = _signed_in(bob)
    for _ in range(3):  # 42 minutes in all, never 15 without a request
        _rewind(client, active=14 * MINUTE, signed_in=14 * MINUTE)
        assert client.get("/studies/").status_code == 200
        assert time.time() - client.session[ACTIVE_AT] < 5
    assert _expired_events() == []


def test_a_request_within_30_seconds_counts_without_writing_the_session(bob):
    client = _signed_in(bob)
    _rewind(client, active=10)
    before = client.session[ACTIVE_AT]
    assert client.get("/studies/").status_code == 200
    assert client.session[ACTIVE_AT] == before
    _rewind(client, active=25)  # 35 s since the last write
    assert client.get("/studies/").status_code == 200
    assert client.session[ACTIVE_AT] > before


def test_the_absolute_limit_ends_even_an_active_session(bob):
    client = _signed_in(bob)
    _rewind(client, signed_in=12 * HOUR + 1)  # active a moment ago

    response = client.get("/inbox/")
    assert response["Location"] == "/accounts/login/?next=/inbox/"
    page = client.get(response["Location"]).content.decode()
    assert "a session lasts at most 12 hours" in page
    (event,) = _expired_events()
    assert (event.actor, event.detail) == (bob, {"reason": "absolute"})


def test_signing_in_again_starts_the_absolute_limit_again(bob):
    client = _signed_in(bob)
    _rewind(client, signed_in=12 * HOUR - MINUTE)
    client.force_login(bob)
    assert time.time() - client.session[SIGNED_IN_AT] < 5
    assert client.get("/studies/").status_code == 200


def test_a_form_sent_after_the_timeout_gets_401_and_changes_nothing(bob):
    client = _signed_in(bob)
    _rewind(client, active=16 * MINUTE)

    response = client.post("/accounts/tokens/", {"name": "after the timeout"})
    assert response.status_code == 401
    assert "Signed out after 15 minutes without activity." in response.content.decode()
    assert 'href="/accounts/login/?next=/accounts/tokens/"' in response.content.decode()
    assert not ApiToken.objects.filter(user=bob, name="after the timeout").exists()
    assert len(_expired_events()) == 1


def test_fetch_and_frame_requests_get_401_json(bob):
    client = _signed_in(bob)
    _rewind(client, active=16 * MINUTE)
    response = client.get("/studies/", headers=FETCH)
    assert response.status_code == 401
    assert response.json()["signed_out"] is True
    assert "15 minutes" in response.json()["reason"]

    # A frame or image request of a page left open is refused the same way, not redirected.
    other = _signed_in(bob)
    _rewind(other, active=16 * MINUTE)
    image = other.get("/studies/", headers={"Sec-Fetch-Dest": "image", "Sec-Fetch-Mode": "no-cors"})
    assert image.status_code == 401


def test_the_upload_api_with_an_ended_session_gets_401(bob):
    client = _signed_in(bob)
    _rewind(client, active=16 * MINUTE)
    response = upload(client, read_testdata("CT_small.dcm"))
    assert response.status_code == 401
    assert response.json()["signed_out"] is True
    assert not Study.objects.exists()


def test_api_token_requests_are_not_timed(bob, bob_token):
    # No session at all: nothing to time out, nothing written.
    assert upload(Client(), dicom_bytes(), token=bob_token).status_code == 201
    assert _expired_events() == []
    # A token sent with an ended session cookie: the session ends, the token still counts.
    client = _signed_in(bob)
    _rewind(client, active=16 * MINUTE)
    assert upload(client, dicom_bytes(), token=bob_token).status_code == 201
    assert "_auth_user_id" not in client.session
    assert len(_expired_events()) == 1


def test_signing_out_after_the_timeout_is_not_an_error(bob):
    client = _signed_in(bob)
    _rewind(client, active=16 * MINUTE)
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert len(_expired_events()) == 1


def test_the_ping_tells_the_time_left_without_counting_as_activity(bob):
    client = _signed_in(bob)
    _rewind(client, active=10 * MINUTE)
    before = client.session[ACTIVE_AT]

    status = client.get(PING, headers=FETCH)
    assert status.status_code == 200
    assert "no-store" in status["Cache-Control"]
    assert 4 * MINUTE < status.json()["left"] <= 5 * MINUTE
    assert status.json()["ends_by"] == "idle"
    assert client.session[ACTIVE_AT] == before  # asking is not activity

    # Another tab's request is: the ping now tells the full time again.
    assert client.get("/studies/").status_code == 200
    assert client.get(PING, headers=FETCH).json()["left"] > 14 * MINUTE


def test_stay_signed_in_refreshes_the_session(bob):
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    page = client.get("/studies/").content.decode()
    _rewind(client, active=14 * MINUTE)
    before = client.session[ACTIVE_AT]

    # Without the CSRF token a page on another site cannot keep the session alive.
    assert client.post(PING, headers=FETCH).status_code == 403
    assert client.session[ACTIVE_AT] == before

    csrf = client.cookies["csrftoken"].value
    response = client.post(PING, headers={**FETCH, "X-CSRFToken": csrf})
    assert response.status_code == 200
    assert response.json()["left"] > 14 * MINUTE
    assert client.session[ACTIVE_AT] > before
    _rewind(client, active=2 * MINUTE)  # 16 minutes after the page, 2 after "Stay signed in"
    assert client.get("/studies/").status_code == 200
    assert 'data-session-ping="/accounts/session/ping/"' in page


def test_the_ping_of_an_ended_session_answers_401(bob):
    client = _signed_in(bob)
    _rewind(client, active=15 * MINUTE + 1)
    response = client.get(PING, headers=FETCH)
    assert response.status_code == 401
    assert response.json()["signed_out"] is True
    assert len(_expired_events()) == 1
    assert client.get(PING, headers=FETCH).status_code == 401  # nobody signed in: nothing to tell


def test_the_page_carries_the_session_clock_for_the_warning(bob, settings):
    settings.RELAY_SESSION_WARN_SECONDS = 90
    html = _signed_in(bob).get("/studies/").content.decode()
    assert 'src="/static/js/session.js"' in html
    assert 'data-session-left="900"' in html or 'data-session-left="899"' in html
    assert 'data-session-warn="90"' in html
    assert 'data-session-login="/accounts/login/"' in html
    assert "<script>" not in html  # no inline script: the page stays CSP-friendly
    # Nobody signed in: no clock, no script.
    anonymous = Client().get("/accounts/login/").content.decode()
    assert "session.js" not in anonymous
    assert "data-session-ping" not in anonymous


def test_a_seconds_setting_overrides_the_minutes(bob, settings):
    settings.RELAY_SESSION_IDLE_SECONDS = 20
    client = _signed_in(bob)
    _rewind(client, active=21)
    response = client.get("/studies/")
    assert response["Location"] == "/accounts/login/?next=/studies/"
    assert (
        "Signed out after 20 seconds without activity."
        in client.get(response["Location"]).content.decode()
    )


def test_the_outsider_ping_without_a_session_learns_nothing(db):
    response = Client().get(PING, headers=FETCH)
    assert response.status_code == 401
    assert "left" not in response.json()


BIRTH_DATE = "1965-04-12"


def test_a_patient_link_session_ends_after_the_same_idle_time(bob, bob_token):
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(Client(), data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get()
    share, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="birth_date",
    )
    assert token is not None
    patient = Client()
    assert patient.post(f"/p/{token}/", {"birth_date": BIRTH_DATE}).status_code == 302
    assert patient.get(f"/p/{token}/studies/").status_code == 200
    _rewind(patient, active=14 * MINUTE)
    assert patient.get(f"/p/{token}/studies/").status_code == 200  # still within the limit

    _rewind(patient, active=15 * MINUTE + 1)
    response = patient.get(f"/p/{token}/studies/")
    # The link asks for its second factor again.
    assert response.status_code == 302
    assert response["Location"] == f"/p/{token}/"
    assert PATIENT_SESSION_KEY not in patient.session
    (event,) = _expired_events()
    assert event.actor is None
    assert event.detail == {"reason": "idle", "via": "patient link", "share_ids": [share.pk]}
    # Neither the link's token nor the patient is in the event.
    assert token not in str(event.detail) and event.patient_id == ""
