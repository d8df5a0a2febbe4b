"""The five journeys of Relay, end to end in real Chromium on the live server, each at a desktop
and at a phone size (a touch screen, 390x844 at twice the pixels):

1. the sender clerk uploads a study (and a README beside it) and shares it in one flow;
2. the outside physician opens a guest link with the e-mailed code and views the images;
3. the patient opens the printed handout's link with their birth date, views and downloads;
4. the facility admin invites a member, adds a PACS destination and reads the estimated bill;
5. the operator issues last month's invoices and opens one.

Every step is asserted as the person would check it, and leaves a full-page screenshot under
<artifacts>/journeys/<journey>/<size>/NN-<step>.png, where <artifacts> is $RELAY_ARTEFACTS or
the clone's var/artifacts (journeys_helpers.artifacts_root).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.core import mail
from django.db import transaction
from django.utils import timezone
from playwright.sync_api import expect

from billing.models import Invoice
from billing.plans import plan_assign
from portal.models import Facility, Invitation, Membership, User
from tests.billing.factories import deliver, local, make_study, per_gb, per_image
from tests.e2e.journeys_helpers import (
    PASSWORD,
    SIZES,
    SLOW_TIMEOUT,
    Browser,
    Shots,
    first_image_drawn,
    newest_mail_to,
    shots_for,
    sign_in,
    store_complete,
)
from tests.helpers import dicom_bytes
from transfers.models import PacsDestination, Share, ShareKind, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db(transaction=True)

CT_STUDY_UID = "1.2.826.0.1.3680043.8.498.15.1"
BIRTH_DATE = "1965-04-12"
DOCTOR = "dr.outside@ruralclinic.example"
GB = 10**9


@pytest.fixture(params=list(SIZES))
def size(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def browser(e2e_browser: Any, size: str) -> Iterator[Browser]:
    opened = Browser(e2e_browser, size)
    yield opened
    opened.close()


@pytest.fixture
def shots(request: pytest.FixtureRequest, size: str) -> Shots:
    journey = request.node.originalname.removeprefix("test_")
    return shots_for(journey, size)


@pytest.fixture
def base(live_server: Any, settings: Any) -> str:
    """The live server, which is also the address links in e-mails and handouts point to."""
    settings.SITE_URL = str(live_server.url)
    return str(live_server.url)


def _not_asked_to_confirm_the_password(page: Any, shots: Shots) -> None:
    """A sensitive change right after signing in (password and second factor) goes through: the
    password is asked again only once the sign-in is older than ACCOUNT_REAUTHENTICATION_TIMEOUT
    (portal/reauth.py)."""
    page.wait_for_load_state()
    if "/accounts/reauthenticate/" in page.url:
        shots(page, "asked-for-the-password-again")
    expect(page, "asked for the password again right after signing in").not_to_have_url(
        re.compile(r"/accounts/reauthenticate/")
    )


@pytest.fixture
def whitefish(transactional_db: None) -> Facility:
    return Facility.objects.create(name="Whitefish Imaging", slug="whitefish")


@pytest.fixture
def kalispell(transactional_db: None) -> Facility:
    return Facility.objects.create(name="Kalispell Regional", slug="krmc", listed=True)


def _user(email: str, facility: Facility | None, role: str, **fields: Any) -> User:
    user = User.objects.create_user(email=email, password=PASSWORD, **fields)
    if facility is not None:
        Membership.objects.create(user=user, facility=facility, role=role)
    return user


@pytest.fixture
def clerk(whitefish: Facility) -> User:
    return _user("clerk@whitefish.example", whitefish, "sender", full_name="Dana Reed")


@pytest.fixture
def reader(kalispell: Facility) -> User:
    """Kalispell's radiologist, who is notified of what is shared with Kalispell."""
    return _user("reader@krmc.example", kalispell, "reader")


def _nav(page: Any, name: str) -> None:
    """Follow a top-bar link as a person does: on a phone the links are behind "Menu" (a
    <details> disclosure), which is opened first when its summary shows."""
    header = page.locator("header.topbar")
    summary = header.locator("details.menu > summary")
    if summary.count() and summary.is_visible():
        menu = header.locator("details.menu")
        if not menu.evaluate("details => details.open"):
            summary.click()
        expect(menu).to_have_attribute("open", "")
    link = header.get_by_role("link", name=name, exact=True)
    expect(link).to_be_visible()
    link.click()


# --- 1. the sender clerk uploads and shares in one flow -------------------------------------------


def test_clerk_uploads_and_shares(
    browser: Browser,
    shots: Shots,
    base: str,
    clerk: User,
    kalispell: Facility,
    reader: User,
    e2e_storage: Path,
    tmp_path: Path,
) -> None:
    PacsDestination.objects.create(
        facility=kalispell, name="Kalispell PACS", ae_title="KRMC_PACS", host="10.1.2.3", port=104
    )
    page = browser.new_page()
    sign_in(page, base, clerk)
    expect(page.get_by_role("heading", name="Sent", level=2)).to_be_visible()
    expect(page.get_by_text("Nothing sent yet.")).to_be_visible()
    shots(page, "home")

    _nav(page, "Upload")
    expect(page).to_have_url(f"{base}/upload/")
    expect(page.get_by_role("heading", name="Upload studies")).to_be_visible()
    expect(page.locator("#dropzone")).to_have_attribute("data-ready", "true")
    shots(page, "upload-page")

    # Two images of one CT study, as on a patient's CD, and the disc's README.
    picked = tmp_path / "CD"
    picked.mkdir()
    for number in (1, 2):
        dicom = picked / f"IM{number:04d}.dcm"
        dicom.write_bytes(
            dicom_bytes("CT_small.dcm", StudyInstanceUID=CT_STUDY_UID, InstanceNumber=number)
        )
    readme = picked / "README.txt"
    readme.write_text("Open the viewer on this disc with VIEWER.EXE.\n")
    page.set_input_files("#pick-files", sorted(picked.iterdir()))
    expect(page.locator("#summary")).to_have_text(
        "Done: 2 stored, 1 skipped (not DICOM)", timeout=SLOW_TIMEOUT
    )
    # By the cell's text: on a phone each cell's accessible name starts with its column's label.
    skipped = page.locator("#files tbody tr").filter(
        has=page.locator("td:first-child", has_text=re.compile(r"^README\.txt$"))
    )
    expect(skipped.locator("td").last).to_have_text("Not a DICOM image, skipped")
    expect(page.locator("#files tbody tr.stored")).to_have_count(2)
    completion = page.locator("#completion")
    expect(completion).to_contain_text("1 study is complete.", timeout=SLOW_TIMEOUT)
    study = Study.objects.get(study_instance_uid=CT_STUDY_UID)
    assert study.status == StudyStatus.COMPLETE and study.num_instances == 2
    shots(page, "uploaded")

    # One study: the summary offers to share "this study".
    completion.get_by_role("link", name="Share this study").click()
    expect(page).to_have_url(f"{base}/share/?study={study.uuid}")
    expect(page.get_by_role("heading", name="Share 1 study")).to_be_visible()
    expect(page.get_by_text("CompressedSamples, CT1")).to_be_visible()
    shots(page, "share-form")

    page.get_by_role("link", name="A facility").click()
    page.get_by_label("Facility").select_option(label="Kalispell Regional")
    # Kalispell has a PACS destination: importing to it is on by default.
    expect(page.get_by_label("Import to their PACS")).to_be_checked()
    page.get_by_label("Message (optional)").fill("Second opinion on the CT, please.")
    shots(page, "share-filled")
    page.get_by_role("button", name="Share", exact=True).click()

    expect(page.get_by_role("heading", name="Shared with Kalispell Regional")).to_be_visible()
    expect(page.locator("ul.messages")).to_have_text("Shared with Kalispell Regional.")
    expect(page.locator("blockquote.message")).to_have_text("Second opinion on the CT, please.")
    studies = page.locator("table.list tbody tr")
    expect(studies).to_have_count(1)
    expect(studies.first).to_contain_text("CompressedSamples, CT1")
    timeline = page.locator("ol.timeline li")
    expect(timeline.filter(has_text="Created")).to_have_count(1)
    expect(timeline.filter(has_text="Recipient notified")).to_have_count(1)
    expect(page.get_by_text("E-mail: Sent")).to_be_visible()
    shots(page, "shared")

    share = Share.objects.get()
    assert share.recipient_facility == kalispell and share.can_import
    # Kalispell's reader is e-mailed: who shared, the message, a link; nothing of the patient.
    notice = newest_mail_to(reader.email)
    assert "Whitefish Imaging shared imaging studies with Kalispell Regional" in notice.body
    assert "Second opinion on the CT, please." in notice.body
    assert f"{base}/" in notice.body
    assert "CompressedSamples" not in notice.subject + notice.body
    assert browser.js_errors == []


# --- 2. the outside physician opens a guest link ---------------------------------------------------


@pytest.fixture
def guest_link(whitefish: Facility, clerk: User, e2e_storage: Path) -> str:
    """A CT study shared with a physician who has no account; the link of the e-mail sent."""
    study = store_complete(
        whitefish,
        clerk,
        [
            dicom_bytes("CT_small.dcm", StudyInstanceUID=CT_STUDY_UID, InstanceNumber=n)
            for n in (1, 2)
        ],
    )
    mail.outbox.clear()
    with transaction.atomic():
        share_create(
            facility=whitefish,
            created_by=clerk,
            studies=[study],
            kind=ShareKind.PHYSICIAN,
            recipient_email=DOCTOR,
            message="Consult requested.",
        )
    notice = newest_mail_to(DOCTOR)
    match = re.search(r"https?://[^/\s]+(/g/[^/\s]+/)", notice.body)
    assert match, notice.body
    return match.group(1)


def test_physician_opens_a_guest_link(
    browser: Browser, shots: Shots, base: str, guest_link: str
) -> None:
    page = browser.new_page()
    page.goto(f"{base}{guest_link}")
    expect(page.get_by_role("heading", name="Studies shared with you")).to_be_visible()
    expect(page.locator("main")).to_contain_text("Whitefish Imaging")
    # Nothing of the patient before the code.
    expect(page.locator("main")).not_to_contain_text("CompressedSamples")
    shots(page, "link-opened")

    mail.outbox.clear()
    page.get_by_role("button", name="E-mail me a code").click()
    expect(page.get_by_text(re.compile(r"We e-mailed a 6-digit code to"))).to_be_visible()
    expect(page.get_by_role("button", name="Send a new code")).to_be_visible()
    message = newest_mail_to(DOCTOR)
    code = re.search(r"\b(\d{6})\b", message.subject)
    assert code, message.subject
    shots(page, "code-sent")

    page.get_by_label("Code").fill(code.group(1))
    page.get_by_role("button", name="Open the studies").click()
    expect(page).to_have_url(f"{base}{guest_link}studies/")
    expect(page.get_by_role("heading", name="Studies shared with you")).to_be_visible()
    expect(page.locator("blockquote.message")).to_have_text("Consult requested.")
    rows = page.locator("table.list tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("CompressedSamples, CT1")
    expect(rows.first.locator("td.num")).to_have_text("2")
    shots(page, "studies")

    rows.first.get_by_role("link", name="View images").click()
    first_image_drawn(page)
    expect(page.locator("#vp0 .ov-image")).to_have_text("Im: 1 / 2")
    shots(page, "viewer")

    page.locator("a.vback").click()
    expect(page).to_have_url(f"{base}{guest_link}studies/")
    expect(page.get_by_role("heading", name="Keep these studies in an account")).to_be_visible()
    expect(page.get_by_role("button", name="Create an account")).to_be_visible()
    shots(page, "back-to-studies")
    assert browser.js_errors == []


# --- 3. the patient opens the handout's link, views and downloads -------------------------------


def test_patient_opens_the_handout_link(
    browser: Browser,
    shots: Shots,
    base: str,
    whitefish: Facility,
    clerk: User,
    e2e_storage: Path,
) -> None:
    study = store_complete(
        whitefish,
        clerk,
        [
            dicom_bytes(
                "CT_small.dcm",
                StudyInstanceUID=CT_STUDY_UID,
                PatientBirthDate=BIRTH_DATE.replace("-", ""),
            )
        ],
    )
    # The clerk shares the study with the patient and prints the handout.
    clerk_page = browser.new_page()
    sign_in(clerk_page, base, clerk)
    _nav(clerk_page, "Studies")
    clerk_page.locator("table.worklist").get_by_role("link", name="CompressedSamples, CT1").click()
    expect(clerk_page).to_have_url(f"{base}/studies/{study.uuid}/")
    clerk_page.get_by_role("link", name="Share", exact=True).click()
    clerk_page.get_by_role("link", name="The patient").click()
    clerk_page.get_by_label("Second factor").select_option(label="Patient's birth date")
    expect(clerk_page.get_by_label("Download")).to_be_checked()
    shots(clerk_page, "clerk-shares-with-the-patient")
    clerk_page.get_by_role("button", name="Share", exact=True).click()

    share = Share.objects.get()
    expect(clerk_page).to_have_url(f"{base}/shares/{share.uuid}/handout/")
    expect(clerk_page.get_by_role("heading", name="Your medical images")).to_be_visible()
    expect(clerk_page.get_by_role("button", name="Print the handout")).to_be_visible()
    expect(clerk_page.locator(".handout")).to_contain_text(
        "You will be asked for your date of birth."
    )
    expect(clerk_page.locator(".handout .qr svg")).to_have_count(1)
    link = clerk_page.locator(".handout p.link").inner_text().strip()
    assert re.fullmatch(rf"{re.escape(base)}/p/[^/\s]+/", link), link
    shots(clerk_page, "handout")

    # The patient, on their own device.
    page = browser.new_page()
    page.goto(link)
    expect(page.get_by_role("heading", name="Your images")).to_be_visible()
    expect(page.get_by_text("To open them, enter your date of birth.")).to_be_visible()
    expect(page.locator("main")).not_to_contain_text("CompressedSamples")
    shots(page, "link-opened")
    page.get_by_label("Your date of birth").fill(BIRTH_DATE)
    page.get_by_role("button", name="Open", exact=True).click()

    expect(page.get_by_role("heading", name="Your studies")).to_be_visible()
    expect(page.locator("main .sub").first).to_contain_text("Shared by Whitefish Imaging")
    rows = page.locator("table.list tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("CompressedSamples, CT1")
    studies_url = page.url
    shots(page, "studies")

    rows.first.get_by_role("link", name="View images").click()
    first_image_drawn(page)
    shots(page, "viewer")
    page.locator("a.vback").click()
    expect(page).to_have_url(studies_url)
    expect(page.get_by_role("heading", name="Your studies")).to_be_visible()

    with page.expect_download() as info:
        page.get_by_role("link", name="Download (ZIP)").click()
    download = info.value
    assert download.suggested_filename.endswith(".zip"), download.suggested_filename
    data = Path(download.path()).read_bytes()
    assert len(data) > 0 and data[:2] == b"PK"
    shots(page, "downloaded")
    assert browser.js_errors == []


# --- 4. the facility admin manages members, destinations and sees the bill -------------------------


@pytest.fixture
def admin(kalispell: Facility) -> User:
    return _user("admin@krmc.example", kalispell, "admin", full_name="Alice Moss")


def test_admin_manages_the_facility(
    browser: Browser,
    shots: Shots,
    base: str,
    kalispell: Facility,
    admin: User,
    reader: User,
) -> None:
    # This month so far: 617.25 GB delivered at USD 2.00 a GB.
    plan_assign(facility=kalispell, plan=per_gb("Per GB", price="2.00"), starts_on=date(2020, 1, 1))
    today = timezone.localdate()
    deliver(
        kalispell,
        nbytes=617_250_000_000,
        images=420,
        at=local(today.replace(day=1), 9),
        study=make_study(kalispell),
    )

    page = browser.new_page()
    sign_in(page, base, admin, second_factor=True)
    shots(page, "home")

    _nav(page, "Kalispell Regional")
    expect(page).to_have_url(f"{base}/facilities/krmc/members/")
    expect(page.get_by_role("heading", name="Kalispell Regional", level=1)).to_be_visible()
    members = page.locator("table.list").first.locator("tbody tr")
    expect(members).to_have_count(2)
    expect(members.filter(has_text=reader.email)).to_have_count(1)
    shots(page, "members")

    page.get_by_label("E-mail").fill("new.tech@krmc.example")
    page.locator("select[name=role]").last.select_option(label="Sender")
    page.get_by_role("button", name="Send invitation").click()
    _not_asked_to_confirm_the_password(page, shots)
    expect(page.locator("ul.messages")).to_have_text("Invitation sent to new.tech@krmc.example.")
    invitations = page.get_by_role("heading", name="Open invitations")
    expect(invitations).to_be_visible()
    invited = page.locator("table.list").last.locator("tbody tr")
    expect(invited).to_have_count(1)
    expect(invited.first).to_contain_text("new.tech@krmc.example")
    expect(invited.first).to_contain_text("Sender")
    assert Invitation.objects.filter(email="new.tech@krmc.example", facility=kalispell).exists()
    assert newest_mail_to("new.tech@krmc.example")
    shots(page, "invited")

    page.get_by_role("link", name="DICOM gateway and routing").click()
    expect(page).to_have_url(f"{base}/facilities/krmc/dicom/")
    expect(
        page.get_by_role("heading", name="Kalispell Regional: DICOM gateway and routing")
    ).to_be_visible()
    shots(page, "dicom")
    form = page.locator("form[action$='/destinations/']")
    form.get_by_label("Name").fill("Main PACS")
    form.get_by_label("AE title").fill("KRMC_PACS")
    form.get_by_label("Host").fill("10.20.30.40")
    form.get_by_label("Port").fill("11112")
    form.get_by_role("button", name="Add").click()
    _not_asked_to_confirm_the_password(page, shots)
    expect(page.locator("ul.messages")).to_have_text("PACS destination added.")
    destination = page.locator("tr").filter(has_text="Main PACS")
    expect(destination).to_have_count(1)
    expect(destination).to_contain_text("KRMC_PACS")
    expect(destination).to_contain_text("10.20.30.40")
    expect(destination).to_contain_text("11112")
    assert PacsDestination.objects.filter(facility=kalispell, ae_title="KRMC_PACS").count() == 1
    shots(page, "destination-added")

    _nav(page, "Kalispell Regional")
    page.locator("main").get_by_role("link", name="Billing", exact=True).click()
    expect(page).to_have_url(f"{base}/facilities/krmc/billing/")
    expect(page.get_by_role("heading", name="Billing · Kalispell Regional")).to_be_visible()
    expect(page.locator("#plan")).to_contain_text("Per GB")
    expect(page.locator("#plan")).to_contain_text("per GB")
    expect(page.locator("#usage")).to_contain_text("617.25")
    expect(page.locator("#usage")).to_contain_text("420 images")
    expect(page.locator("#estimate")).to_have_text("USD 1,234.50")
    shots(page, "billing")
    assert browser.js_errors == []


# --- 5. the operator issues invoices ---------------------------------------------------------------


@pytest.fixture
def operator(transactional_db: None) -> User:
    return _user("operator@relay.example", None, "", is_staff=True)


def test_operator_issues_invoices(
    browser: Browser,
    shots: Shots,
    base: str,
    settings: Any,
    operator: User,
    whitefish: Facility,
    kalispell: Facility,
) -> None:
    settings.RELAY_SELLER_NAME = "Relay Imaging Network LLC"
    settings.RELAY_PAYMENT_TERMS_DAYS = 30
    settings.RELAY_SELLER_ADDRESS = "100 Main Street\nHelena, MT 59601"
    # Deliveries of last month: Kalispell pays per image, Whitefish per GB.
    last_month = (timezone.localdate().replace(day=1) - timedelta(days=1)).replace(day=1)
    plan_assign(
        facility=kalispell, plan=per_image("Per image", price="0.0100"), starts_on=date(2020, 1, 1)
    )
    plan_assign(facility=whitefish, plan=per_gb("Per GB", price="2.00"), starts_on=date(2020, 1, 1))
    deliver(
        kalispell,
        nbytes=3 * GB,
        images=123_450,
        at=local(last_month + timedelta(days=2)),
        study=make_study(kalispell),
    )
    deliver(
        whitefish,
        nbytes=5 * GB,
        images=50,
        at=local(last_month + timedelta(days=3)),
        study=make_study(whitefish),
    )
    month = f"{last_month:%B %Y}"

    page = browser.new_page()
    sign_in(page, base, operator, second_factor=True)
    _nav(page, "Billing")
    expect(page).to_have_url(f"{base}/billing/")
    expect(page.get_by_role("heading", name=re.compile(r"^Billing · "))).to_be_visible()
    expect(page.get_by_role("heading", name=f"Invoices for {month}")).to_be_visible()
    expect(page.get_by_text("Not issued yet.")).to_be_visible()
    expect(page.locator("#unpaid-summary")).to_have_text("None.")
    shots(page, "dashboard")

    page.get_by_role("button", name=f"Issue invoices for {month}").click()
    _not_asked_to_confirm_the_password(page, shots)
    expect(page.locator("ul.messages")).to_contain_text(
        f"{month}: 2 invoices issued, 0 already issued"
    )
    expect(page.get_by_text(f"2 invoices issued for {month}.")).to_be_visible()
    assert Invoice.objects.filter(period=last_month).count() == 2
    unpaid = page.locator("#unpaid tbody tr")
    expect(unpaid).to_have_count(2)
    expect(page.locator("#unpaid-summary")).to_have_text("2 invoices, USD 1,244.50 due")
    shots(page, "issued")

    row = unpaid.filter(has_text="Kalispell Regional")
    expect(row.locator("td").last).to_have_text("USD 1,234.50")
    number = row.get_by_role("link").inner_text()
    row.get_by_role("link").click()
    expect(page.get_by_role("heading", name=f"Invoice {number}")).to_be_visible()
    expect(page.locator("#seller")).to_contain_text("Relay Imaging Network LLC")
    expect(page.locator("#seller")).to_contain_text("Helena, MT 59601")
    expect(page.locator("#bill-to")).to_contain_text("Kalispell Regional")
    expect(page.locator("#total")).to_have_text("USD 1,234.50")
    expect(page.locator("dl.facts")).to_contain_text(month)
    expect(page.get_by_role("link", name="Download PDF")).to_be_visible()
    invoice = Invoice.objects.get(number=number)
    assert invoice.total == Decimal("1234.50")
    # Due 30 days (RELAY_PAYMENT_TERMS_DAYS) after the day it was issued, in the billing zone.
    issued = invoice.issued_at.astimezone(ZoneInfo(settings.RELAY_BILLING_TIME_ZONE)).date()
    due = issued + timedelta(days=30)
    expect(page.locator("#due")).to_have_text(f"{due:%B} {due.day}, {due.year}")
    expect(page.locator("#terms")).to_contain_text("Net 30")
    shots(page, "invoice")
    assert browser.js_errors == []
