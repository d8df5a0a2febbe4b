"""The study viewer, end to end: real Chromium on the live server, real DICOM files.

Each step leaves a screenshot under $RELAY_ARTEFACTS/viewer (or the test's tmp_path); the path is
printed so that a person can look at what the browser showed.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from django.test import Client
from playwright.sync_api import expect
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import Facility, Membership, User
from relay.management.commands.seed_demo import demo_ct_series
from transfers.ingest import instance_ingest
from transfers.models import Study
from transfers.reports import report_attach
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "e2e viewer 12 slices"
# The first frames are decoded on demand by the live server; on a loaded CI machine that has
# taken seconds.
LOAD_TIMEOUT = 60_000
# Red channel statistics of a canvas: how many distinct values, and a hash to compare two draws.
CANVAS_STATS_JS = """
(selector) => {
  const canvas = document.querySelector(selector);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  let hash = 2166136261;
  for (let i = 0; i < data.length; i += 4) {
    seen.add(data[i]);
    hash = Math.imul(hash ^ data[i], 16777619) >>> 0;
  }
  return { distinct: seen.size, hash, width: canvas.width, height: canvas.height };
}
"""


@pytest.fixture
def artefacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    base = Path(os.environ["RELAY_ARTEFACTS"]) if os.environ.get("RELAY_ARTEFACTS") else tmp_path
    folder = base / "viewer" / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of {request.node.name}: {folder}")
    return folder


@pytest.fixture
def facility(transactional_db: None) -> Facility:
    return Facility.objects.create(name="St. Luke Community Healthcare", slug="stluke")


@pytest.fixture
def reader(facility: Facility) -> User:
    user = User.objects.create_user(email="reader@stluke.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=facility, role="sender")
    return user


def _store(facility: Facility, user: User, files: list[bytes]) -> Study:
    for data in files:
        result = instance_ingest(facility=facility, user=user, chunks=[data])
        assert result.status == "stored", result
    return Study.objects.get(facility=facility, study_instance_uid=_study_uid(files[0]))


def _study_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


def _sign_in(page: Any, user: User, live_server: Any) -> None:
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"]
    page.context.add_cookies([{"name": "sessionid", "value": cookie.value, "url": live_server.url}])


def _open(page: Any, live_server: Any, study: Study) -> Any:
    response = page.goto(f"{live_server.url}/studies/{study.uuid}/view/")
    assert response.status == 200
    return page.locator("#vp0")


def _drawn(viewport: Any, index: int) -> None:
    expect(viewport).to_have_attribute("data-drawn-index", str(index), timeout=LOAD_TIMEOUT)
    expect(viewport).to_have_attribute("data-state", "ready")


def _stats(page: Any, selector: str = "#vp0 canvas") -> dict[str, int]:
    return dict(page.evaluate(CANVAS_STATS_JS, selector))


def _shot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 5_000
    return path


def _image_to_screen(
    page: Any, viewport: Any, x: float, y: float, size: int
) -> tuple[float, float]:
    """Where image point (x, y) of a fitted, unrotated square image of `size` px is on the page."""
    box = page.locator("#vp0 canvas").bounding_box()
    scale = float(viewport.get_attribute("data-scale"))
    return (
        box["x"] + box["width"] / 2 + (x - size / 2) * scale,
        box["y"] + box["height"] / 2 + (y - size / 2) * scale,
    )


# --- a CT stack ---------------------------------------------------------------------------------


@pytest.fixture
def ct_study(facility: Facility, reader: User, e2e_storage: Path) -> Study:
    study = _store(facility, reader, demo_ct_series(12))
    report_attach(study=study, by=reader, text="No acute findings.", for_patient=True)
    return study


def test_a_ct_stack_draws_scrolls_and_windows_in_the_browser(
    e2e_page: Any,
    e2e_js_errors: list[str],
    ct_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
) -> None:
    page = e2e_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, ct_study)

    _drawn(viewport, 0)
    first = _stats(page)
    assert first["distinct"] > 20, first
    expect(viewport.locator(".ov-image")).to_have_text("Im: 1 / 12")
    expect(viewport.locator(".ov-name")).to_have_text("DEMO, ANNA M")
    expect(viewport.locator(".ov-id")).to_have_text("ID: KRMC-100234")
    expect(viewport.locator(".ov-birth")).to_have_text("Born: 1961-04-12 F")
    expect(viewport.locator(".ov-date")).to_contain_text("2026-11-02")
    expect(viewport.locator(".ov-series")).to_contain_text("AXIAL 5MM")
    expect(viewport.locator(".ov-slice")).to_contain_text("Loc: -100 mm")
    expect(viewport.locator(".ov-zoom")).to_have_text(re.compile(r"^Zoom: \d+%$"))
    expect(page.locator(".thumb")).to_have_count(1)
    _shot(page, artefacts, "01-ct-first-image")

    # Every frame arrives (nearest first) and the progress line goes away.
    expect(viewport).to_have_attribute("data-loaded", "12", timeout=LOAD_TIMEOUT)
    expect(viewport.locator(".ov-progress")).to_have_text("")

    page.locator("#vp0 canvas").hover()
    page.keyboard.press("End")
    _drawn(viewport, 11)
    expect(viewport.locator(".ov-image")).to_have_text("Im: 12 / 12")
    expect(viewport.locator(".ov-slice")).to_contain_text("Loc: -45 mm")
    _shot(page, artefacts, "02-ct-last-slice")
    page.mouse.wheel(0, -100)
    _drawn(viewport, 10)
    expect(viewport.locator(".ov-image")).to_have_text("Im: 11 / 12")
    page.keyboard.press("Home")
    _drawn(viewport, 0)
    page.mouse.wheel(0, 100)
    expect(viewport.locator(".ov-image")).to_have_text("Im: 2 / 12")

    # Window/level by dragging: the values and the pixels change, and no frame is fetched.
    before = _stats(page)
    center = float(viewport.get_attribute("data-window-center"))
    width = float(viewport.get_attribute("data-window-width"))
    window_text = viewport.locator(".ov-window").text_content()
    assert window_text == f"W: {_num(width)} L: {_num(center)}"
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url) if "/frames/" in r.url else None)
    box = page.locator("#vp0 canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 80, y + 40, steps=8)
    page.mouse.up()
    expect(viewport.locator(".ov-window")).not_to_have_text(window_text)
    new_center = float(viewport.get_attribute("data-window-center"))
    new_width = float(viewport.get_attribute("data-window-width"))
    assert new_width < width  # dragged left: narrower
    assert new_center > center  # dragged down: higher level
    assert viewport.locator(".ov-window").text_content() == (
        f"W: {_num(new_width)} L: {_num(new_center)}"
    )
    # The overlay is written by the same draw that painted the canvas.
    after = _stats(page)
    assert after["hash"] != before["hash"]
    assert fetched == []
    _shot(page, artefacts, "03-ct-window-dragged")

    # A preset, the probe in HU, invert and rotate, all without the server.
    page.keyboard.press("3")
    expect(viewport.locator(".ov-window")).to_have_text("W: 1500 L: -600")
    page.keyboard.press("x")
    page.mouse.move(x + 3, y + 3)
    expect(viewport.locator(".ov-probe")).to_have_text(re.compile(r"^X \d+ Y \d+: -?\d+ HU$"))
    _shot(page, artefacts, "04-ct-lung-window-probe")
    page.keyboard.press("i")
    page.keyboard.press("r")
    expect(viewport.locator(".ov-orient")).to_have_text("Inverted  Rot 90°")
    page.keyboard.press("0")
    expect(viewport.locator(".ov-window")).to_have_text(window_text)
    assert fetched == []

    # Cine: plays through the stack at the chosen rate, stops on Space.
    page.fill("#fps", "30")
    page.locator("#vp0 canvas").click()  # the probe tool: a click only reads a value
    page.keyboard.press("Home")
    _drawn(viewport, 0)
    page.keyboard.press(" ")
    expect(page.locator("#cine")).to_have_text("Stop")
    expect(viewport).to_have_attribute("data-image-index", re.compile(r"^([4-9]|1[01])$"))
    page.keyboard.press(" ")
    expect(page.locator("#cine")).to_have_text("Play")
    # The step taken just before the stop may still be drawn (the overlay follows on the next
    # animation frame); from then on a stopped cine stays where it is.
    page.wait_for_timeout(150)
    stopped = viewport.get_attribute("data-image-index")
    page.wait_for_timeout(400)
    assert viewport.get_attribute("data-image-index") == stopped

    # The report panel.
    page.get_by_role("button", name="Report").click()
    expect(page.locator("#report-panel")).to_contain_text("No acute findings.")
    _shot(page, artefacts, "05-report")
    page.get_by_role("button", name="Report").click()
    expect(page.locator("#report-panel")).to_be_hidden()

    # The help overlay lists the shortcuts.
    page.keyboard.press("?")
    expect(page.locator("#help")).to_be_visible()
    expect(page.locator("#help")).to_contain_text("Page Up / Page Down")
    _shot(page, artefacts, "06-help")
    page.keyboard.press("Escape")
    expect(page.locator("#help")).to_be_hidden()

    # Side by side: the second viewport shows the same (only) series, drawn on its own.
    page.get_by_role("button", name="1x2").click()
    second = page.locator("#vp1")
    _drawn(second, 0)
    assert _stats(page, "#vp1 canvas")["distinct"] > 20
    _shot(page, artefacts, "07-side-by-side")
    assert e2e_js_errors == []


def _num(value: float) -> str:
    """The overlay's number format (static/js/viewer/windowing.js `num`): at most two decimals, no trailing zeros."""
    rounded = round(value * 100) / 100
    return str(int(rounded)) if rounded == int(rounded) else str(rounded)


# --- an MR image --------------------------------------------------------------------------------


def test_an_mr_image_is_drawn(
    e2e_page: Any,
    e2e_js_errors: list[str],
    facility: Facility,
    reader: User,
    e2e_storage: Path,
    live_server: Any,
    artefacts: Path,
) -> None:
    study = _store(facility, reader, [Path(get_testdata_file("MR_small.dcm")).read_bytes()])
    page = e2e_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, study)
    _drawn(viewport, 0)
    assert _stats(page)["distinct"] > 20
    expect(viewport.locator(".ov-image")).to_have_text("Im: 1 / 1")
    expect(viewport.locator(".ov-window")).to_have_text(re.compile(r"^W: \S+ L: \S+$"))
    # No CT presets on an MR (they are Hounsfield windows): the file's window and auto only.
    expect(page.locator("#preset option")).to_have_text(
        ["Window…", "Default from file (0)", "Auto (Shift+A)"]
    )
    _shot(page, artefacts, "01-mr")
    assert e2e_js_errors == []


# --- measuring ----------------------------------------------------------------------------------


def _square_image(series_number: int, **spacing: Any) -> bytes:
    """A 256 x 256 MONOCHROME2 image: a gradient with a bright cross at its centre."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in spacing.items():
        setattr(ds, keyword, value)
    pixels = (np.add.outer(np.arange(256), np.arange(256)) * 4).astype(np.int16)
    pixels[126:130, :] = 3000
    pixels[:, 126:130] = 3000
    ds.Rows = ds.Columns = 256
    ds.PixelData = pixels.tobytes()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.4100"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"SPACING {series_number}"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def measure_study(facility: Facility, reader: User, e2e_storage: Path) -> Study:
    return _store(
        facility,
        reader,
        [
            _square_image(1, PixelSpacing=[0.5, 0.5]),
            _square_image(2, ImagerPixelSpacing=[0.2, 0.2]),
            _square_image(3),
        ],
    )


def _measure(page: Any, viewport: Any, start: tuple[int, int], end: tuple[int, int]) -> str:
    a = _image_to_screen(page, viewport, *start, size=256)
    b = _image_to_screen(page, viewport, *end, size=256)
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=6)
    page.mouse.up()
    text = page.locator("#measurement")
    expect(text).to_have_text(re.compile(r"^Length: "))
    return str(text.text_content())


def _length(text: str, unit: str) -> float:
    match = re.fullmatch(r"Length: ([\d.]+) " + re.escape(unit), text)
    assert match, text
    return float(match.group(1))


def test_it_measures_in_millimetres_from_the_pixel_spacing(
    e2e_page: Any,
    e2e_js_errors: list[str],
    measure_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
) -> None:
    page = e2e_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, measure_study)
    _drawn(viewport, 0)
    # Fitted: the whole 256 px image fills the shorter side of the canvas.
    box = page.locator("#vp0 canvas").bounding_box()
    scale = float(viewport.get_attribute("data-scale"))
    assert scale == pytest.approx(min(box["width"], box["height"]) / 256, rel=1e-3)
    expect(viewport.locator(".ov-zoom")).to_have_text(f"Zoom: {round(scale * 100)}%")

    page.get_by_role("button", name="Measure").click()
    # 200 px across the image at 0.5 mm per pixel: 100 mm.
    text = _measure(page, viewport, (28, 128), (228, 128))
    assert _length(text, "mm") == pytest.approx(100.0, abs=0.5)
    # 120 x 160 px diagonal: 200 px, 100 mm.
    text = _measure(page, viewport, (40, 40), (160, 200))
    assert _length(text, "mm") == pytest.approx(100.0, abs=0.5)
    _shot(page, artefacts, "01-measured-pixel-spacing")

    # Zoomed in around the centre, the same image distance is the same length.
    page.keyboard.press("z")
    page.keyboard.press("m")
    box = page.locator("#vp0 canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.keyboard.down("Control")
    page.mouse.wheel(0, -200)
    page.keyboard.up("Control")
    expect(viewport).not_to_have_attribute("data-scale", str(scale))
    zoomed = float(viewport.get_attribute("data-scale"))
    assert zoomed > scale
    text = _measure(page, viewport, (98, 128), (158, 128))
    assert _length(text, "mm") == pytest.approx(30.0, abs=0.5)
    _shot(page, artefacts, "02-measured-zoomed")

    page.locator(".thumb").nth(1).click()
    expect(viewport.locator(".ov-series")).to_contain_text("SPACING 2")
    _drawn(viewport, 0)
    text = _measure(page, viewport, (28, 128), (228, 128))
    assert _length(text, "mm (imager)") == pytest.approx(40.0, abs=0.3)
    _shot(page, artefacts, "03-measured-imager-spacing")

    page.locator(".thumb").nth(2).click()
    expect(viewport.locator(".ov-series")).to_contain_text("SPACING 3")
    _drawn(viewport, 0)
    text = _measure(page, viewport, (28, 128), (228, 128))
    assert _length(text, "px") == pytest.approx(200.0, abs=1.0)
    assert e2e_js_errors == []


# --- a phone ------------------------------------------------------------------------------------


@pytest.fixture
def phone_page(e2e_browser: Any, e2e_js_errors: list[str]) -> Iterator[Any]:
    context = e2e_browser.new_context(
        viewport={"width": 390, "height": 844},
        has_touch=True,
        is_mobile=True,
        device_scale_factor=2,
    )
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("pageerror", lambda error: e2e_js_errors.append(str(error)))
    yield page
    context.close()


def test_a_phone_sized_window_shows_the_image(
    phone_page: Any,
    e2e_js_errors: list[str],
    ct_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
) -> None:
    page = phone_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, ct_study)
    _drawn(viewport, 0)
    box = page.locator("#vp0 canvas").bounding_box()
    assert box["width"] >= 350 and box["height"] >= 300, box
    stats = _stats(page)
    assert stats["distinct"] > 20
    assert stats["width"] == round(box["width"] * 2)  # drawn at the phone's pixel density
    # Nothing sticks out sideways: the page itself does not scroll.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    expect(page.locator(".thumb")).to_be_visible()
    expect(viewport.locator(".ov-image")).to_have_text("Im: 1 / 12")
    # A tap on "next" through the slider, as a thumb would.
    page.locator("#vp0 .vp-slider").fill("6")
    _drawn(viewport, 5)
    expect(viewport.locator(".ov-image")).to_have_text("Im: 6 / 12")
    _shot(page, artefacts, "01-phone")

    # Real touch input (Chromium turns it into pointer events, as on a phone).
    touch = _Touch(page)
    mid_x, mid_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    # One finger swiped up 120 px: on 3 images (40 px per image on this height).
    touch.move([(mid_x, mid_y + 60)], [(mid_x, mid_y - 60)])
    _drawn(viewport, 8)
    expect(viewport.locator(".ov-image")).to_have_text("Im: 9 / 12")
    # Pinch out to three times the distance: three times the zoom.
    scale = float(viewport.get_attribute("data-scale"))
    touch.move(
        [(mid_x - 40, mid_y), (mid_x + 40, mid_y)],
        [(mid_x - 120, mid_y), (mid_x + 120, mid_y)],
    )
    assert float(viewport.get_attribute("data-scale")) == pytest.approx(scale * 3, rel=0.02)
    # Two fingers dragged down together: window/level, no zoom.
    zoomed = viewport.get_attribute("data-scale")
    center = float(viewport.get_attribute("data-window-center"))
    touch.move(
        [(mid_x - 40, mid_y - 80), (mid_x + 40, mid_y - 80)],
        [(mid_x - 40, mid_y + 80), (mid_x + 40, mid_y + 80)],
    )
    assert float(viewport.get_attribute("data-window-center")) > center
    assert viewport.get_attribute("data-scale") == zoomed
    expect(viewport.locator(".ov-image")).to_have_text("Im: 9 / 12")
    _shot(page, artefacts, "02-phone-pinched-and-windowed")
    assert e2e_js_errors == []


class _Touch:
    """Touches sent through the DevTools protocol: real touch input, not synthetic DOM events."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.cdp = page.context.new_cdp_session(page)

    def _send(self, kind: str, points: list[tuple[float, float]]) -> None:
        self.cdp.send(
            "Input.dispatchTouchEvent",
            {
                "type": kind,
                "touchPoints": [{"x": x, "y": y, "id": i} for i, (x, y) in enumerate(points)],
            },
        )

    def move(
        self, start: list[tuple[float, float]], end: list[tuple[float, float]], steps: int = 12
    ) -> None:
        self._send("touchStart", start)
        for step in range(1, steps + 1):
            t = step / steps
            self._send(
                "touchMove",
                [
                    (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)
                    for a, b in zip(start, end, strict=True)
                ],
            )
        self._send("touchEnd", [])
        # The viewer draws on the next animation frame.
        self.page.evaluate("() => new Promise((done) => requestAnimationFrame(() => done()))")


# --- no access ----------------------------------------------------------------------------------


def test_someone_without_access_gets_404_and_no_pixels(
    e2e_page: Any,
    ct_study: Study,
    live_server: Any,
    artefacts: Path,
) -> None:
    outsider_facility = Facility.objects.create(name="Great Falls Clinic", slug="gfc")
    outsider = User.objects.create_user(email="charlie@gfc.example", password=PASSWORD)
    Membership.objects.create(user=outsider, facility=outsider_facility, role="sender")
    page = e2e_page
    _sign_in(page, outsider, live_server)
    response = page.goto(f"{live_server.url}/studies/{ct_study.uuid}/view/")
    assert response.status == 404
    expect(page.locator("canvas")).to_have_count(0)
    assert "DEMO" not in page.content()
    sop = ct_study.series.get().instances.first().sop_instance_uid  # type: ignore[union-attr]
    base = f"/studies/{ct_study.uuid}/view/"
    statuses = page.evaluate(
        """async (urls) => Promise.all(urls.map(async (url) => {
             const response = await fetch(url);
             return [response.status, (await response.arrayBuffer()).byteLength > 0 &&
                     response.headers.get("X-Relay-Frame") !== null];
           }))""",
        [f"{base}frames/{sop}/0/", f"{base}study.json", f"{base}thumbs/x/"],
    )
    assert statuses == [[404, False], [404, False], [404, False]]
    _shot(page, artefacts, "01-no-access")


# --- a patient ----------------------------------------------------------------------------------


@pytest.fixture
def patient_token(ct_study: Study, reader: User) -> str:
    _, token = share_create(
        facility=ct_study.facility,
        created_by=reader,
        studies=[ct_study],
        kind="patient",
        second_factor="birth_date",
        can_download=False,
    )
    assert token is not None
    return token


def test_a_patient_opens_the_viewer_from_their_list(
    e2e_page: Any,
    e2e_js_errors: list[str],
    ct_study: Study,
    patient_token: str,
    live_server: Any,
    artefacts: Path,
) -> None:
    # The patient opens the link and answers the second factor in the browser.
    page = e2e_page
    page.goto(f"{live_server.url}/p/{patient_token}/")
    page.fill("input[name=birth_date]", "1961-04-12")
    page.get_by_role("button", name="Open").click()
    expect(page.get_by_role("heading", name="Your studies")).to_be_visible()
    expect(page.get_by_role("link", name="Download (ZIP)")).to_have_count(0)
    page.get_by_role("link", name="View images").click()
    expect(page).to_have_url(f"{live_server.url}/p/{patient_token}/studies/{ct_study.uuid}/view/")
    viewport = page.locator("#vp0")
    _drawn(viewport, 0)
    assert _stats(page)["distinct"] > 20
    expect(viewport.locator(".ov-name")).to_have_text("DEMO, ANNA M")
    expect(page.locator("#download")).to_have_count(0)
    _shot(page, artefacts, "01-patient-viewer")
    assert e2e_js_errors == []
