"""Every page at phone size (390x844, touch, 2x): nothing wider than the screen, and a top bar of
at most two lines (issue 15, item 5).

One browser context per persona of tests/test_access_matrix.py (plus a staff member with two
facilities, the longest top bar); each visits every page of the matrix and every page its menu
leads to, and the patient and guest pages. A page a persona may not see answers the styled 404
or the sign-in page, which must fit too. A screenshot of each page goes to var/artifacts/phone/.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from portal.models import Facility, Membership, User
from tests.helpers import client_for
from tests.transfers.test_worklist import make_study
from transfers.dicom.config import routing_rule_add
from transfers.models import PacsDestination, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db(transaction=True)

PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "device_scale_factor": 2,
}
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "artifacts" / "phone"
# Two lines of the top bar (brand and Menu, or a patient page's sender) with their padding.
TOPBAR_MAX_HEIGHT = 120
BIRTH_DATE = date(1965, 4, 12)
# Long unbreakable strings, as real data has them: the page must wrap them, not widen.
LONG_EMAIL = "referring.physician.with.a.long.name@northwestern-montana-imaging.example"
LONG_NAME = "VERYLONGFAMILYNAMEWITHOUTSPACES^FIRSTNAMEALSOQUITELONG"

# Elements that reach past the screen's right edge: "parent > tag#id.class right=N width=N" for
# the assertion message. A mobile browser zooms out to show an overflowing page whole, and
# window.innerWidth then grows with it: the limit is the phone's width, passed in.
OVERFLOW_JS = """(screenWidth) => {
  const limit = Math.min(window.innerWidth, document.documentElement.clientWidth, screenWidth);
  const over = (el) => {
    const box = el.getBoundingClientRect();
    return box.width > 0 && box.right > limit + 0.5;
  };
  const name = (el) => {
    let text = el.tagName.toLowerCase();
    if (el.id) text += '#' + el.id;
    if (typeof el.className === 'string' && el.className.trim()) {
      text += '.' + el.className.trim().split(/\\s+/).join('.');
    }
    const box = el.getBoundingClientRect();
    return `${text} right=${Math.round(box.right)} width=${Math.round(box.width)}`;
  };
  // The outermost elements that stick out, and the innermost ones (usually the culprits).
  const outer = [], inner = [];
  for (const el of document.querySelectorAll('body *')) {
    if (!over(el)) continue;
    const parent = el.parentElement;
    if (!parent || !over(parent)) outer.push(`${parent ? name(parent) : ''} > ${name(el)}`);
    if (![...el.children].some(over)) inner.push(name(el));
  }
  return {
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: limit,
    offenders: [...outer.slice(0, 6), ...inner.slice(0, 6).map((text) => 'inside: ' + text)],
  };
}"""


def _visit(page: Any, url: str, persona: str, name: str, problems: list[str]) -> None:
    response = page.goto(url)
    if response is not None and response.status >= 500:
        problems.append(f"{persona} {name} ({url}): answered {response.status}")
    _check(page, persona, name, problems)


def _check(
    page: Any, persona: str, name: str, problems: list[str], *, menu_open: bool = False
) -> None:
    """Record what does not fit on this page, and take its screenshot. An opened menu makes the
    top bar as tall as it needs."""
    page.screenshot(path=str(ARTIFACTS / f"{persona}-{name}.png"), full_page=True)
    fit = page.evaluate(OVERFLOW_JS, PHONE["viewport"]["width"])
    if fit["scrollWidth"] > fit["innerWidth"]:
        problems.append(
            f"{persona} {name} ({page.url}): document {fit['scrollWidth']} px wide in a "
            f"{fit['innerWidth']} px window; too wide: {'; '.join(fit['offenders'])}"
        )
    topbar = page.locator("header.topbar")
    if topbar.count() and not menu_open:
        height = topbar.bounding_box()["height"]
        if height > TOPBAR_MAX_HEIGHT:
            problems.append(f"{persona} {name}: top bar {height:.0f} px tall")


@pytest.fixture
def world(krmc: Facility, gfc: Facility, alice: User, bob: User, carol: User, charlie: User) -> Any:
    """Kalispell's studies, shares of every kind, a PACS destination and a routing rule."""
    studies = [
        make_study(
            krmc,
            n,
            patient_name=LONG_NAME if n == 1 else f"DOE^JANE{n}",
            patient_birth_date=BIRTH_DATE,
            study_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}1234567890123456789012345678901",
            description="CT CHEST ABDOMEN PELVIS WITH CONTRAST",
            status=StudyStatus.COMPLETE,
        )
        for n in (1, 2, 3)
    ]
    make_study(gfc, 9, patient_name="GREAT^FALLS", status=StudyStatus.COMPLETE)
    study = studies[0]
    to_gfc, _ = share_create(
        facility=krmc,
        created_by=bob,
        studies=studies[:2],
        kind="facility",
        recipient_facility=gfc,
        message="Please compare with the prior study; " * 4,
    )
    mail.outbox.clear()
    guest_share, _ = share_create(
        facility=krmc,
        created_by=bob,
        studies=[study],
        kind="physician",
        recipient_email=LONG_EMAIL,
        message="Consult requested.",
        can_download=True,
    )
    guest_link = next(
        m.group(1)
        for message in mail.outbox
        if (m := re.search(r"https?://[^/\s]+(/g/[^/\s]+/)", str(message.body)))
    )
    _, patient_token = share_create(
        facility=krmc,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="birth_date",
        can_download=True,
    )
    PacsDestination.objects.create(
        facility=krmc,
        name="Main PACS in the basement of the north building",
        ae_title="KRMC_PACS_MAIN",
        host="pacs-primary.radiology.kalispell-regional.example",
        port=11112,
    )
    routing_rule_add(
        facility=krmc, by=alice, calling_ae="CT_SCANNER_01", modality="CT", recipient_facility=gfc
    )
    staff = User.objects.create_user(
        email="operations.manager@relay-montana.example", password="x", full_name="Staff"
    )
    staff.is_staff = True
    staff.save()
    Membership.objects.create(user=staff, facility=krmc, role="admin")
    Membership.objects.create(user=staff, facility=gfc, role="admin")
    return {
        "study": study,
        "share": to_gfc,
        "guest_share": guest_share,
        "guest_link": guest_link,
        "patient_token": patient_token,
        "staff": staff,
    }


def _signed_in(browser: Any, live_server: Any, client: Client) -> Any:
    context = browser.new_context(**PHONE)
    context.set_default_timeout(15_000)
    cookie = client.cookies.get("sessionid")
    if cookie is not None:
        context.add_cookies([{"name": "sessionid", "value": cookie.value, "url": live_server.url}])
    return context


def _portal_pages(world: Any) -> dict[str, str]:
    study: Study = world["study"]
    share: Share = world["share"]
    return {
        "home": "/",
        "worklist": "/studies/",
        "received": "/studies/?show=received",
        "study": f"/studies/{study.uuid}/",
        "upload": "/upload/",
        "inbox": "/inbox/",
        "sent": "/sent/",
        "share": f"/shares/{share.uuid}/",
        "guest-share": f"/shares/{world['guest_share'].uuid}/",
        "share-new": f"/share/?study={study.uuid}",
        "share-form": f"/share/?study={study.uuid}&to=physician",
        "pacs": f"/studies/{study.uuid}/pacs/",
        "members": "/facilities/krmc/members/",
        "audit": "/facilities/krmc/audit/",
        "dicom": "/facilities/krmc/dicom/",
        "facility-billing": "/facilities/krmc/billing/",
        "profile": "/accounts/profile/",
        "billing": "/billing/",
        "not-found": "/no-such-page/",
    }


@pytest.mark.parametrize("persona", ["alice", "bob", "carol", "charlie", "staff"])
def test_it_fits_every_portal_page_on_a_phone(
    request: Any, persona: str, world: Any, live_server: Any, e2e_browser: Any
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    user = world["staff"] if persona == "staff" else request.getfixturevalue(persona)
    context = _signed_in(e2e_browser, live_server, client_for(user))
    page = context.new_page()
    problems: list[str] = []
    try:
        for name, path in _portal_pages(world).items():
            _visit(page, live_server.url + path, persona, name, problems)
            assert "/accounts/login/" not in page.url, f"{persona} was signed out at {path}"
        # On a phone the menu starts closed: one tap opens its links, the facility switcher
        # and Sign out, which fit as well.
        page.goto(live_server.url + "/")
        menu = page.locator("header.topbar details.menu")
        sign_out = page.get_by_role("button", name="Sign out")
        menu_closed = menu.count() == 1 and not sign_out.is_visible()
        if menu_closed:
            menu.locator("summary").tap()
            _check(page, persona, "menu-open", problems, menu_open=True)
            if not sign_out.is_visible():
                problems.append(f"{persona}: Sign out is not in the opened menu")
        else:
            problems.append(f"{persona}: no closed menu in the top bar on a phone")
    finally:
        context.close()
    assert not problems, "\n".join(problems)


def test_it_fits_the_sign_in_patient_and_guest_pages_on_a_phone(
    world: Any, live_server: Any, e2e_browser: Any
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    token = world["patient_token"]
    link = world["guest_link"]

    context = _signed_in(e2e_browser, live_server, Client())
    page = context.new_page()
    try:
        for name, path in {
            "login": "/accounts/login/",
            "worklist": "/studies/",  # the sign-in page again, with ?next=
            "not-found": "/no-such-page/",
            "patient-factor": f"/p/{token}/",
            "guest-open": link,
        }.items():
            _visit(page, live_server.url + path, "anon", name, problems)
        # The patient types the birth date printed nowhere but in her memory.
        page.goto(f"{live_server.url}/p/{token}/")
        page.locator("input[name=birth_date]").fill(BIRTH_DATE.isoformat())
        page.locator("main form button[type=submit], main form button:not([type])").first.click()
        page.wait_for_url(f"{live_server.url}/p/{token}/studies/")
        _check(page, "anon", "patient-studies", problems)
        summary = page.get_by_role("link", name="Summary to print")
        if summary.count():
            _visit(
                page,
                live_server.url + summary.first.get_attribute("href"),
                "anon",
                "patient-summary",
                problems,
            )
    finally:
        context.close()

    # The guest physician: a code sent to his address, typed in once.
    guest = Client()
    mail.outbox.clear()
    assert guest.post(link, {"send": "1"}).status_code == 302
    found = re.search(r"\b(\d{6})\b", str(mail.outbox[-1].subject))
    assert found, mail.outbox[-1].subject
    code = found.group(1)
    assert guest.post(link, {"code": code}).status_code == 302
    context = _signed_in(e2e_browser, live_server, guest)
    page = context.new_page()
    try:
        page.goto(f"{live_server.url}{link}studies/")
        assert page.url.endswith("/studies/"), page.url
        _check(page, "guest", "guest-studies", problems)
    finally:
        context.close()
    assert not problems, "\n".join(problems)
