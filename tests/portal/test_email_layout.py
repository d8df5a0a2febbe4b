"""Relay's e-mails: one HTML layout (the sending facility's name or Relay, one button, nothing
fetched from outside), a plain-text part that shows the sender's words as written, and dates in
the recipient's time zone with the zone named."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone
from django.utils.html import escape

from billing.models import Invoice
from portal.emails import email_render
from portal.models import Facility, Invitation, User
from tests.helpers import read_testdata, upload
from transfers.models import Share, Study, StudyStatus
from transfers.models.sharing import LinkLock
from transfers.models.studies import StorageVerifyRun

# Jan 3, 2027, 06:59 UTC is Jan 2, 2027, 11:59 PM in Denver (MST, UTC-7).
EXPIRES = datetime(2027, 1, 3, 6, 59, tzinfo=UTC)
DENVER = "Jan 2, 2027, 11:59 PM MST"
HOSTILE = "Dr O'Brien says: <script>alert(1)</script> & see you"
FACILITY = "St. Mary's & Co"

SENDER = Facility(name=FACILITY, slug="stmarys")
RECIPIENT = Facility(name="Great Falls Clinic", slug="gfc")
CLERK = User(email="bob@stmarys.example", full_name="Bob Clerk")


def _share(**extra: Any) -> Share:
    return Share(
        facility=SENDER,
        created_by=CLERK,
        expires_at=EXPIRES,
        created_at=EXPIRES - timedelta(days=30),
        message=HOSTILE,
        **extra,
    )


def _contexts() -> dict[str, tuple[dict[str, Any], str | None]]:
    """Every e-mail: a context to render it with, and whose name heads it (None: Relay's)."""
    invitation = Invitation(role="reader", expires_at=EXPIRES)
    link = "/shares/00000000-0000-0000-0000-000000000000/"
    return {
        "integrity_failed": (
            {"where": "viewer", "instance_id": 7, "facility": SENDER, "reason": "hash differs"},
            None,
        ),
        "invitation": (
            {"invitation": invitation, "facility": SENDER, "inviter": CLERK, "token": "t0k"},
            FACILITY,
        ),
        "guest_code": (
            {"share": _share(), "code": "042917", "expires_at": EXPIRES, "minutes": 10},
            FACILITY,
        ),
        "invoice_issued": (
            {
                "invoice": Invoice(
                    number="RLY-2026-12-0001",
                    facility_name=FACILITY,
                    period=date(2026, 12, 1),
                    currency="USD",
                    total=Decimal("12.50"),
                    studies=3,
                    courier_cost=Decimal("90.00"),
                ),
                "link": "/billing/stmarys/invoices/x/",
            },
            None,
        ),
        "media_ready": ({"export": SimpleNamespace(media="CD"), "link": "/studies/x/"}, None),
        "password_reset": (
            {"email": "bob@stmarys.example", "uid": "MQ", "token": "abc-123"},
            None,
        ),
        "patient_link": ({"share": _share(second_factor="dob"), "link": "/p/tok/"}, FACILITY),
        "patient_link_locked": (
            {
                "share": _share(second_factor="pin"),
                "lock": LinkLock(round=1, until=EXPIRES),
                "rounds": 3,
                "link": link,
            },
            FACILITY,
        ),
        "share_expiring": (
            {"share": _share(), "recipient": "Great Falls Clinic", "num_studies": 2, "link": link},
            FACILITY,
        ),
        "share_images_added": ({"share": _share(), "added": 3, "link": link}, FACILITY),
        "share_notify": ({"share": _share(), "link": link}, FACILITY),
        "storage_verify": (
            {"run": StorageVerifyRun(pk=4, checked=10), "report": "10 objects <all> intact"},
            None,
        ),
    }


EMAILS = sorted(
    p.name for p in (Path(settings.BASE_DIR) / "templates" / "emails").iterdir() if p.is_dir()
)
# The operator's alerts, and the guest's code (typed on the page that asked for it): no link.
WITHOUT_LINK = {"guest_code", "integrity_failed", "storage_verify"}


def test_it_has_a_context_for_every_email_template() -> None:
    assert sorted(_contexts()) == EMAILS


@pytest.mark.parametrize("name", EMAILS)
def test_it_renders_every_email_through_the_one_layout(name: str, settings: Any) -> None:
    settings.TIME_ZONE = "America/Denver"
    context, sender = _contexts()[name]
    subject, text, html = email_render(name, context)

    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert f"<title>{escape(subject)}</title>" in html
    header = re.search(r'data-email="sender"[^>]*>(.*?)</td>', html, re.S)
    assert header is not None, "the message does not use templates/emails/base.html"
    if sender is None:
        assert header.group(1).strip() == "Relay"
    else:
        assert "St. Mary&#x27;s &amp; Co" in header.group(1)
        assert "via Relay" in header.group(1)

    buttons = re.findall(r'data-email="button".*?<a href="([^"]+)"', html, re.S)
    if name in WITHOUT_LINK:
        assert buttons == []
    else:
        assert len(buttons) == 1, buttons
        assert buttons[0].startswith(settings.SITE_URL + "/")
        assert buttons[0] in text  # the plain-text part carries the same link
        assert len(re.findall(r"<a\s", html)) == 1  # the button is the only link

    # Nothing fetched from outside: no image, stylesheet, font or remote background.
    for fetch in ("<img", "<link", "<script", "url(", "@import", "background="):
        assert fetch not in html.lower()
    # Plain-text part and subject never carry HTML escapes.
    for escaped in ("&#x27;", "&lt;", "&gt;", "&amp;", "&quot;"):
        assert escaped not in subject + text
    # Named zone, no "p.m." or "Jan." from Django's default format.
    assert "p.m." not in subject + text + html and "a.m." not in subject + text + html
    assert "Jan." not in subject + text + html


def test_it_shows_the_senders_message_as_written_in_text_and_escaped_in_html() -> None:
    subject, text, html = email_render("share_notify", {"share": _share(), "link": "/shares/x/"})
    assert HOSTILE in text
    assert f"{FACILITY} shared imaging studies" in text
    assert subject == f"{FACILITY} shared images with you on Relay"
    assert "<script>" not in html
    assert "Dr O&#x27;Brien says: &lt;script&gt;alert(1)&lt;/script&gt; &amp; see you" in html


@pytest.mark.parametrize(
    "name", ["invitation", "patient_link", "share_images_added", "share_notify"]
)
def test_it_writes_expiry_dates_in_the_recipients_zone_named(name: str, settings: Any) -> None:
    settings.TIME_ZONE = "America/Denver"
    _subject, text, html = email_render(name, _contexts()[name][0])
    assert DENVER in text
    assert DENVER in html


def test_it_names_summer_time_and_other_zones(settings: Any) -> None:
    settings.TIME_ZONE = "America/Denver"
    share = _share()
    share.expires_at = datetime(2027, 7, 1, 18, 0, tzinfo=UTC)
    context = {"share": share, "recipient": "Great Falls Clinic", "num_studies": 1, "link": "/"}
    subject, text, _html = email_render("share_expiring", context)
    assert "Jul 1, 2027, 12:00 PM MDT" in text
    assert subject == "Your Relay share with Great Falls Clinic expires Jul 1, 2027"
    _subject, text, _html = email_render("share_expiring", context, time_zone="America/New_York")
    assert "Jul 1, 2027, 2:00 PM EDT" in text


# --- through the real sending path --------------------------------------------------------------


@pytest.mark.django_db
def test_the_share_notice_sent_carries_the_message_literally(
    client: Client,
    bob: User,
    bob_token: str,
    charlie: User,
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    settings.TIME_ZONE = "America/Denver"
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get()
    client.force_login(bob)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/share/",
            {
                "study": [str(study.uuid)],
                "kind": "facility",
                "recipient_facility": Facility.objects.get(slug="gfc").pk,
                "message": HOSTILE,
                "expires_on": (timezone.localdate() + timedelta(days=10)).isoformat(),
                "can_view": "on",
                "can_download": "on",
            },
        )
    assert response.status_code == 302, response.content.decode()[:2000]
    share = Share.objects.get()
    (message,) = mailoutbox
    html = message.alternatives[0][0]
    assert HOSTILE in message.body
    assert "&#x27;" not in message.body and "&lt;" not in message.body
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'data-email="sender"' in html and "Kalispell Regional Medical Center" in html
    denver = timezone.localtime(share.expires_at, ZoneInfo("America/Denver"))
    expected = denver.strftime("%b %-d, %Y, %-I:%M %p %Z")  # e.g. "Jan 2, 2027, 11:59 PM MST"
    assert f"The share is available until {expected}." in message.body
    assert f"available until {expected}." in html
