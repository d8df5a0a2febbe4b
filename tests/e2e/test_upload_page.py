"""The browser upload page, end to end: real Chromium, the live server, real DICOM files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from playwright.sync_api import expect
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import Facility, Membership, User
from transfers.models import Instance, Study, person_name_display

PASSWORD = "e2e upload page 7 horses"
# A handful of small files takes a second or two, but once, on a shared two-core machine under
# load, a single file took longer than 30 s.
UPLOAD_TIMEOUT = 60_000
SCREENSHOT_COPY = Path("/tmp/relay-upload-page.png")
HOSTILE_NAME = "<script>window.__pwned=1</script>^X"
HOSTILE_DESCRIPTION = "<script>window.__pwned=2</script>"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def e2e_facility(transactional_db: None) -> Facility:
    return Facility.objects.create(name="Whitefish Imaging", slug="whitefish")


@pytest.fixture
def e2e_other_facility(transactional_db: None) -> Facility:
    return Facility.objects.create(name="Havre Clinic", slug="havre")


@pytest.fixture
def e2e_sender(e2e_facility: Facility, e2e_other_facility: Facility) -> User:
    # A sender at two facilities, so the page's facility choice matters.
    user = User.objects.create_user(email="tech@whitefish.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=e2e_other_facility, role="sender")
    Membership.objects.create(user=user, facility=e2e_facility, role="sender")
    return user


@pytest.fixture
def e2e_upload_page(
    e2e_page: Any, e2e_sender: User, e2e_facility: Facility, e2e_storage: Path, live_server: Any
) -> Any:
    """The upload page, reached by signing in through the login form, facility chosen."""
    page = e2e_page
    page.goto(f"{live_server.url}/upload/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.fill("input[name=login]", e2e_sender.email)
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(f"{live_server.url}/upload/")
    expect(page.get_by_role("heading", name="Upload studies")).to_be_visible()
    page.select_option("#facility", e2e_facility.slug)
    # The module script has attached its handlers (keyboard, drop, pickers) once it marks the zone.
    expect(page.locator("#dropzone")).to_have_attribute("data-ready", "true")
    return page


def _copy_testdata(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(get_testdata_file(name), folder / name)) for name in names]


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _row(page: Any, path: str) -> Any:
    return page.locator("#files tbody tr").filter(
        has=page.get_by_role("cell", name=path, exact=True)
    )


def _upload_mixed_batch(page: Any, tmp_path: Path) -> list[Path]:
    """Three DICOM files and a text file through 'Choose files'; waits for the summary."""
    dicoms = _copy_testdata(tmp_path / "picked", "CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
    notes = tmp_path / "picked" / "notes.txt"
    notes.write_text("Patient brought a CD and a referral letter.\n")
    page.set_input_files("#pick-files", [*dicoms, notes])
    expect(page.locator("#summary")).to_have_text(
        "Done: 3 stored, 1 skipped (not DICOM)", timeout=UPLOAD_TIMEOUT
    )
    return dicoms


def test_it_uploads_chosen_files_and_skips_what_is_not_dicom(
    e2e_upload_page: Any,
    e2e_facility: Facility,
    e2e_js_errors: list[str],
    live_server: Any,
    tmp_path: Path,
) -> None:
    page = e2e_upload_page
    dicoms = _upload_mixed_batch(page, tmp_path)

    expect(page.locator("#overall-text")).to_contain_text("4 of 4 files")
    # The page ends with the manifest, and the server marks the three studies complete.
    # None of them is shared yet: nobody is said to be notified (tests/e2e/test_upload_flow.py).
    expect(page.locator("#completion").locator("p").first).to_have_text(
        "3 studies are complete.", timeout=UPLOAD_TIMEOUT
    )
    assert set(Study.objects.values_list("status", flat=True)) == {"complete"}
    assert page.eval_on_selector("#overall-bar", "bar => bar.value === bar.max")
    skipped = _row(page, "notes.txt")
    expect(skipped).to_have_class("skipped")
    expect(skipped.locator("td").last).to_have_text("Not a DICOM image, skipped")
    for path in dicoms:
        row = _row(page, path.name)
        expect(row).to_have_class("stored")
        expect(row.locator("td").last).to_have_text("Stored")

    stored = Instance.objects.filter(facility=e2e_facility)
    assert sorted(stored.values_list("sop_instance_uid", flat=True)) == sorted(
        _sop_uid(p) for p in dicoms
    )
    assert Instance.objects.count() == 3

    page.goto(f"{live_server.url}/studies/")
    worklist = page.locator("table.worklist")
    expect(worklist.get_by_role("link", name="CompressedSamples, CT1")).to_be_visible()
    expect(worklist.get_by_role("link", name="CompressedSamples, MR1")).to_be_visible()
    expect(worklist.get_by_role("link", name="Last, First mid")).to_be_visible()
    expect(page.get_by_text("3 studies")).to_be_visible()
    assert e2e_js_errors == []


def test_it_uploads_a_folder_and_reports_a_second_upload_as_already_stored(
    e2e_upload_page: Any,
    e2e_facility: Facility,
    e2e_storage: Path,
    e2e_js_errors: list[str],
    tmp_path: Path,
) -> None:
    page = e2e_upload_page
    folder = tmp_path / "CD0417"
    files = [
        *_copy_testdata(folder, "CT_small.dcm", "MR_small.dcm"),
        *_copy_testdata(folder / "SERIES2", "JPEG2000.dcm"),
    ]
    page.set_input_files("#pick-folder", folder)
    expect(page.locator("#summary")).to_have_text("Done: 3 stored", timeout=UPLOAD_TIMEOUT)
    _manifest_sent(page)
    # The table names each file by its path inside the chosen folder.
    expect(_row(page, "CD0417/SERIES2/JPEG2000.dcm")).to_have_class("stored")
    assert Instance.objects.filter(facility=e2e_facility).count() == 3
    keys = set(Instance.objects.values_list("storage_key", flat=True))

    page.set_input_files("#pick-folder", folder)
    expect(page.locator("#summary")).to_have_text(
        "Done: 3 stored, 3 already stored", timeout=UPLOAD_TIMEOUT
    )
    _manifest_sent(page)
    duplicates = page.locator("#files tbody tr.duplicate")
    expect(duplicates).to_have_count(3)
    for path in files:
        relative = path.relative_to(tmp_path).as_posix()
        row = _row(page, relative).and_(duplicates)
        expect(row.locator("td").last).to_contain_text("Already stored")
    assert Instance.objects.count() == 3
    assert set(Instance.objects.values_list("storage_key", flat=True)) == keys
    assert len(list(e2e_storage.rglob("*.dcm"))) == 3
    assert e2e_js_errors == []


def test_it_shows_a_patient_name_holding_html_as_text(
    e2e_upload_page: Any,
    e2e_js_errors: list[str],
    live_server: Any,
    tmp_path: Path,
) -> None:
    page = e2e_upload_page
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = HOSTILE_NAME
    # '=' separates the component groups of a DICOM person name, so the worklist shows only
    # '<script>window.__pwned' of the name; the description carries a whole script element.
    ds.StudyDescription = HOSTILE_DESCRIPTION
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    hostile = tmp_path / "hostile.dcm"
    ds.save_as(hostile, enforce_file_format=True)

    page.set_input_files("#pick-files", hostile)
    expect(page.locator("#summary")).to_have_text("Done: 1 stored", timeout=UPLOAD_TIMEOUT)
    _manifest_sent(page)

    page.goto(f"{live_server.url}/studies/")
    shown_name = person_name_display(HOSTILE_NAME)
    assert shown_name == "<script>window.__pwned"
    row = page.locator("table.worklist tbody tr")
    expect(row).to_have_count(1)
    name = row.get_by_role("link", name=shown_name, exact=True)
    expect(name).to_be_visible()
    expect(row.get_by_role("cell", name=HOSTILE_DESCRIPTION, exact=True)).to_be_visible()
    expect(page.locator("main script")).to_have_count(0)
    assert page.evaluate("typeof window.__pwned") == "undefined"

    name.click()
    expect(page.get_by_role("heading", level=1)).to_have_text(shown_name)
    expect(page.get_by_text(HOSTILE_DESCRIPTION, exact=True)).to_be_visible()
    expect(page.locator("main script")).to_have_count(0)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert e2e_js_errors == []


def test_it_leaves_a_screenshot_of_the_finished_upload_page(
    e2e_upload_page: Any, e2e_js_errors: list[str], tmp_path: Path
) -> None:
    page = e2e_upload_page
    _upload_mixed_batch(page, tmp_path)
    shot = tmp_path / "upload-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert shot.stat().st_size > 10_000
    # For a person to look at after the run.
    shutil.copyfile(shot, SCREENSHOT_COPY)
    assert e2e_js_errors == []


def test_a_sender_of_several_facilities_must_choose_one_first(
    e2e_upload_page: Any, e2e_js_errors: list[str], tmp_path: Path
) -> None:
    page = e2e_upload_page
    page.select_option("#facility", "")
    dicoms = _copy_testdata(tmp_path / "unsure", "CT_small.dcm")
    page.set_input_files("#pick-files", dicoms)
    expect(page.locator("#summary")).to_have_text("Choose the facility to upload to first.")
    assert Instance.objects.count() == 0
    assert e2e_js_errors == []


def _manifest_sent(page: Any) -> None:
    """The page ends a batch with the manifest; the test waits for its answer, so the server is
    not still writing when the test's database is emptied."""
    expect(page.locator("#completion")).to_be_visible(timeout=UPLOAD_TIMEOUT)


def test_the_facility_is_fixed_while_files_upload(
    e2e_upload_page: Any, e2e_facility: Facility, e2e_other_facility: Facility, tmp_path: Path
) -> None:
    page = e2e_upload_page
    names = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "waveform_ecg.dcm")
    page.set_input_files("#pick-files", _copy_testdata(tmp_path / "batch", *names))
    # Changing the menu right after choosing files must not move the rest of the batch.
    page.evaluate(
        "slug => { const s = document.getElementById('facility'); s.disabled = false; s.value = slug; }",
        e2e_other_facility.slug,
    )
    expect(page.locator("#summary")).to_have_text("Done: 5 stored", timeout=UPLOAD_TIMEOUT)
    _manifest_sent(page)
    assert Instance.objects.filter(facility=e2e_facility).count() == 5
    assert not Instance.objects.filter(facility=e2e_other_facility).exists()


def test_keyboard_users_open_the_file_picker_from_the_drop_zone(e2e_upload_page: Any) -> None:
    page = e2e_upload_page
    # Playwright turns on file-chooser interception when the first listener is added, in a
    # message of its own; a key pressed right after can still open the native dialog instead
    # (no event). So listen first, and let one round trip to the page pass before pressing.
    page.on("filechooser", lambda chooser: None)
    page.evaluate("0")
    page.focus("#dropzone")
    expect(page.locator("#dropzone")).to_be_focused()
    with page.expect_file_chooser(timeout=UPLOAD_TIMEOUT) as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
