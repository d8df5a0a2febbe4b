"""Upload, then share, in one flow: a clerk uploads a study with a README beside it, reads a calm
"skipped" line for the README, and goes from the summary to the study and to the share form."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import expect

from portal.models import Facility, Membership, User
from tests.helpers import dicom_bytes
from transfers.ingest import instance_ingest
from transfers.models import Study
from transfers.sharing.services import share_create

PASSWORD = "e2e upload flow 4 rivers"
UPLOAD_TIMEOUT = 60_000
ALARM_RED = "rgb(180, 35, 24)"  # --bad in relay.css

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def whitefish(transactional_db: None) -> Facility:
    return Facility.objects.create(name="Whitefish Imaging", slug="whitefish")


@pytest.fixture
def kalispell(transactional_db: None) -> Facility:
    return Facility.objects.create(name="Kalispell Regional", slug="krmc", listed=True)


@pytest.fixture
def clerk(whitefish: Facility) -> User:
    user = User.objects.create_user(email="clerk@whitefish.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=whitefish, role="sender")
    return user


@pytest.fixture
def upload_page(e2e_page: Any, clerk: User, e2e_storage: Path, live_server: Any) -> Any:
    page = e2e_page
    page.goto(f"{live_server.url}/upload/")
    page.fill("input[name=login]", clerk.email)
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(f"{live_server.url}/upload/")
    expect(page.locator("#dropzone")).to_have_attribute("data-ready", "true")
    return page


def test_a_clerk_uploads_skips_the_readme_calmly_and_goes_on_to_share(
    upload_page: Any, kalispell: Facility, e2e_js_errors: list[str], tmp_path: Path
) -> None:
    page = upload_page
    # Nothing is uploading yet: no empty progress bar.
    expect(page.locator("#overall")).to_be_hidden()
    expect(page.locator("#overall-bar")).to_be_hidden()

    files = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        files.append(tmp_path / name)
        files[-1].write_bytes(dicom_bytes(name))
    readme = tmp_path / "README.txt"
    readme.write_text("Open the viewer on this disc with VIEWER.EXE.\n")
    page.set_input_files("#pick-files", [*files, readme])

    expect(page.locator("#summary")).to_have_text(
        "Done: 2 stored, 1 skipped (not DICOM)", timeout=UPLOAD_TIMEOUT
    )
    row = page.locator("#files tbody tr").filter(has=page.get_by_role("cell", name="README.txt"))
    expect(row).to_have_class("skipped")
    result = row.locator("td").last
    expect(result).to_have_text("Not a DICOM image, skipped")
    assert result.evaluate("cell => getComputedStyle(cell).color") != ALARM_RED
    assert page.get_by_text("Rejected").count() == 0

    completion = page.locator("#completion")
    expect(completion).to_contain_text("2 studies are complete.", timeout=UPLOAD_TIMEOUT)
    # Nobody has been sent these studies yet, so nobody is being notified.
    expect(completion).not_to_contain_text("notified")
    uuids = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        # CompressedSamples^CT1 and CompressedSamples^MR1
        study = Study.objects.get(patient_name__endswith=name[:2] + "1")
        uuids.append(str(study.uuid))
        link = completion.get_by_role("link", name=f"Study of {name}")
        expect(link).to_have_attribute("href", f"/studies/{study.uuid}/")

    completion.get_by_role("link", name="Share these studies").click()
    expect(page).to_have_url(re.compile(r"/share/\?study=[^&]+&study=[^&]+$"))
    assert sorted(parse_qs(urlsplit(page.url).query)["study"]) == sorted(uuids)
    expect(page.get_by_role("heading", name="Share 2 studies")).to_be_visible()
    page.get_by_role("link", name="A facility").click()
    expect(page.get_by_label("Facility")).to_be_visible()
    expect(page.get_by_label("E-mail")).to_have_count(0)
    expect(page.get_by_text("This message is e-mailed to the recipient.")).to_be_visible()
    assert e2e_js_errors == []


def test_it_says_recipients_are_notified_when_the_study_is_shared(
    upload_page: Any,
    whitefish: Facility,
    kalispell: Facility,
    clerk: User,
    e2e_js_errors: list[str],
    tmp_path: Path,
) -> None:
    page = upload_page
    first = dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.826.0.1.3680043.99.7")
    instance_ingest(facility=whitefish, user=clerk, chunks=[first])
    share_create(
        facility=whitefish,
        created_by=clerk,
        studies=[Study.objects.get()],
        kind="facility",
        recipient_facility=kalispell,
    )
    more = tmp_path / "slice-2.dcm"
    more.write_bytes(dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.826.0.1.3680043.99.7"))
    page.set_input_files("#pick-files", [more])
    expect(page.locator("#completion")).to_contain_text(
        "1 study is complete. Recipients of its share are notified.", timeout=UPLOAD_TIMEOUT
    )
    assert e2e_js_errors == []
