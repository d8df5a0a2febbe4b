"""Issue 15, item 2: the current facility, always in the top bar, and the switcher for people who
belong to more than one. The choice is kept in the session and checked against the memberships on
every request."""

from __future__ import annotations

import pytest

from portal.models import AuditAction, AuditEvent, Facility, Membership, Outcome, User
from tests.helpers import client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def both(bob: User, gfc: Facility) -> User:
    """bob sends for Kalispell and reads at Great Falls."""
    Membership.objects.create(user=bob, facility=gfc, role="reader")
    return bob


def _topbar(html: str) -> str:
    return html[html.index('<header class="topbar">') : html.index("</header>")]


def test_the_top_bar_shows_the_current_facility_and_role(carol, krmc):
    bar = _topbar(client_for(carol).get("/studies/").content.decode())
    assert "Kalispell Regional Medical Center" in bar
    assert "Reader" in bar
    # One facility: nothing to switch to.
    assert 'action="/facility/"' not in bar


def test_it_offers_the_switch_to_a_member_of_two(both):
    bar = _topbar(client_for(both).get("/studies/").content.decode())
    assert 'action="/facility/"' in bar
    assert '<option value="gfc"' in bar
    assert '<option value="krmc" selected' in bar


def test_it_switches_and_comes_back_to_the_page(both, gfc):
    browser = client_for(both)
    response = browser.post("/facility/", {"facility": "gfc", "next": "/studies/"})
    assert response.status_code == 302
    assert response["Location"] == "/studies/"
    bar = _topbar(browser.get("/studies/").content.decode())
    assert '<option value="gfc" selected' in bar
    assert "Reader" in bar
    event = AuditEvent.objects.get(actor=both, action=AuditAction.FACILITY_SWITCH)
    assert event.facility == gfc
    assert event.detail["current_facility"] == "gfc"


def test_it_refuses_a_facility_the_user_is_not_a_member_of(bob, krmc, gfc):
    browser = client_for(bob)
    response = browser.post("/facility/", {"facility": "gfc", "next": "/studies/"})
    assert response.status_code == 404
    assert "<h1>Page not found</h1>" in response.content.decode()
    refusal = AuditEvent.objects.get(action=AuditAction.ACCESS_DENIED)
    assert refusal.actor == bob
    assert refusal.outcome == Outcome.FAILURE
    assert refusal.detail["page"] == "facility switch"
    assert "Kalispell" in _topbar(browser.get("/studies/").content.decode())


@pytest.mark.parametrize(
    "next_url", ["https://evil.example/", "//evil.example/studies/", "javascript:alert(1)", ""]
)
def test_it_goes_home_rather_than_to_another_site(both, next_url):
    response = client_for(both).post("/facility/", {"facility": "gfc", "next": next_url})
    assert response.status_code == 302
    assert response["Location"] == "/"


def test_it_answers_only_posts(both):
    assert client_for(both).get("/facility/", {"facility": "gfc"}).status_code == 405


def test_a_removed_membership_falls_back_to_the_first_remaining(both, gfc):
    browser = client_for(both)
    browser.post("/facility/", {"facility": "gfc", "next": "/"})
    Membership.objects.filter(user=both, facility=gfc).delete()
    bar = _topbar(browser.get("/studies/").content.decode())
    assert "Kalispell Regional Medical Center" in bar
    assert "Great Falls Clinic" not in bar
    assert browser.session["current_facility"] == Facility.objects.get(slug="krmc").pk


def test_the_upload_page_starts_on_the_current_facility(alice, krmc, gfc):
    Membership.objects.create(user=alice, facility=gfc, role="sender")
    browser = client_for(alice)
    browser.post("/facility/", {"facility": "gfc", "next": "/"})
    html = browser.get("/upload/").content.decode()
    assert '<option value="gfc" selected>' in html
