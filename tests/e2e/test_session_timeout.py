"""The idle-timeout warning, end to end: real Chromium, the live server, a session of seconds.

The idle limit is 6 s and the warning shows 4 s before it (RELAY_SESSION_IDLE_SECONDS,
RELAY_SESSION_WARN_SECONDS), so each test runs in about ten seconds of real time.
"""

from __future__ import annotations

import re
from importlib import import_module
from typing import Any

import pytest
from django.conf import settings as django_settings
from playwright.sync_api import expect

from portal.middleware import ACTIVE_AT, SessionTimeoutMiddleware
from portal.models import AuditAction, AuditEvent, Facility, Membership, User

PASSWORD = "e2e session timeout 9 kites"
IDLE = 6
WARN = 4
# Long enough for the whole countdown plus a loaded machine; the tests end as soon as it is met.
OUTCOME_TIMEOUT = (IDLE + 20) * 1000
MIDDLEWARE = f"{SessionTimeoutMiddleware.__module__}.{SessionTimeoutMiddleware.__name__}"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _short_sessions(settings: Any) -> None:
    # The live server's middleware was loaded once, from relay/settings.py: it must be there.
    assert MIDDLEWARE in settings.MIDDLEWARE, f"relay/settings.py MIDDLEWARE lacks {MIDDLEWARE}"
    settings.RELAY_SESSION_IDLE_SECONDS = IDLE
    settings.RELAY_SESSION_WARN_SECONDS = WARN
    settings.RELAY_SESSION_MAX_HOURS = 12


@pytest.fixture
def e2e_reader(transactional_db: None) -> User:
    facility = Facility.objects.create(name="Havre Clinic", slug="havre")
    user = User.objects.create_user(email="reader@havre.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=facility, role="reader")
    return user


def _sign_in(page: Any, live_server: Any, user: User) -> None:
    page.goto(f"{live_server.url}/studies/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.get_by_label("E-mail").fill(user.email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(f"{live_server.url}/studies/")


def _last_activity(page: Any) -> float:
    """The server's record of the browser session's last activity."""
    (cookie,) = [
        c for c in page.context.cookies() if c["name"] == django_settings.SESSION_COOKIE_NAME
    ]
    store = import_module(django_settings.SESSION_ENGINE).SessionStore(session_key=cookie["value"])
    return float(store[ACTIVE_AT])


def _lands_on_sign_in(page: Any, live_server: Any, user: User) -> None:
    expect(page).to_have_url(
        f"{live_server.url}/accounts/login/?next=%2Fstudies%2F", timeout=OUTCOME_TIMEOUT
    )
    expect(page.get_by_text(f"Signed out after {IDLE} seconds without activity.")).to_be_visible()
    events = AuditEvent.objects.filter(action=AuditAction.SESSION_EXPIRED)
    assert [(e.actor, e.detail) for e in events] == [(user, {"reason": "idle"})]


def test_the_warning_counts_down_and_stay_signed_in_keeps_the_session(
    e2e_page: Any, e2e_reader: User, live_server: Any, e2e_js_errors: list[str]
) -> None:
    page = e2e_page
    _sign_in(page, live_server, e2e_reader)
    warning = page.get_by_role("alertdialog")
    stay = warning.get_by_role("button", name="Stay signed in")

    expect(warning).to_be_visible(timeout=OUTCOME_TIMEOUT)
    expect(warning).to_contain_text(
        re.compile(r"You will be signed out in 0:0[0-4] for inactivity\.")
    )
    # An alert dialog takes the focus: a keyboard or screen reader user is told and can answer.
    expect(stay).to_be_focused()
    before = _last_activity(page)
    stay.click()
    expect(warning).to_be_hidden()
    assert _last_activity(page) > before
    expect(page).to_have_url(f"{live_server.url}/studies/")

    # Left alone again, the warning comes back and, at zero, the sign-in page says why.
    expect(warning).to_be_visible(timeout=OUTCOME_TIMEOUT)
    _lands_on_sign_in(page, live_server, e2e_reader)
    assert e2e_js_errors == []


def test_an_idle_tab_does_not_warn_while_another_tab_is_active(
    e2e_page: Any, e2e_reader: User, live_server: Any, e2e_js_errors: list[str]
) -> None:
    idle_tab = e2e_page
    _sign_in(idle_tab, live_server, e2e_reader)
    pings: list[Any] = []
    idle_tab.on("response", lambda r: pings.append(r) if "/session/ping/" in r.url else None)
    busy_tab = idle_tab.context.new_page()

    # Someone works in the other tab until the idle tab has asked the server twice.
    for _ in range(400):
        busy_tab.goto(f"{live_server.url}/inbox/")
        if len(pings) >= 2:
            break
    assert len(pings) >= 2, "the idle tab never asked how long the session has left"
    answers = [ping.json() for ping in pings]
    assert all(answer["left"] > WARN for answer in answers), answers
    expect(idle_tab.get_by_role("alertdialog")).to_be_hidden()
    expect(idle_tab).to_have_url(f"{live_server.url}/studies/")

    # Once nobody works anywhere, the idle tab warns and then signs out.
    busy_tab.close()
    expect(idle_tab.get_by_role("alertdialog")).to_be_visible(timeout=OUTCOME_TIMEOUT)
    _lands_on_sign_in(idle_tab, live_server, e2e_reader)
    assert e2e_js_errors == []
