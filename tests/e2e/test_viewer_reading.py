"""The viewer as a reading tool, end to end in Chromium: orientation markers, window/level
sensitivity and presets, layouts with synchronized scrolling and reference lines, ROI and angle
measurements, the tag browser, the cine rate from the file, Save picture and the patients' simple
mode.

Every study here is generated with pydicom with a known geometry and known values, so that what
the viewer reads off the screen can be checked against the truth.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import expect
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import Facility, User
from tests.e2e import test_viewer as base
from tests.e2e.test_viewer import LOAD_TIMEOUT, _drawn, _open, _shot, _sign_in, _store, _Touch
from transfers.models import Study
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db(transaction=True)

# The viewer tests' own fixtures: a facility, its reader, a folder for screenshots.
facility = base.facility
reader = base.reader
artefacts = base.artefacts

STUDY_UID = "1.2.826.0.1.3680043.8.498.5100"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.5101"
SIZE = 256
SPACING = 0.5
NOISE_SD = 10.0
RECT = (64, 192)  # rows and columns 64..191 hold 100 + noise; elsewhere 0

AXIAL = [1, 0, 0, 0, 1, 0]
SAGITTAL = [0, 1, 0, 0, 0, -1]
CORONAL = [1, 0, 0, 0, 0, -1]


def _dataset(
    pixels: np.ndarray,
    *,
    series_uid: str,
    series_number: int,
    description: str,
    instance_number: int = 1,
    **attributes: Any,
) -> bytes:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = instance_number
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
    ds.PatientBirthDate = "19610412"
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    for keyword in ("SliceLocation",):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _phantom() -> np.ndarray:
    """A square of 100 HU with Gaussian noise (SD 10) on a background of 0 HU."""
    rng = np.random.default_rng(16)
    pixels = np.zeros((SIZE, SIZE), dtype=np.int16)
    a, b = RECT
    pixels[a:b, a:b] = np.round(100 + rng.normal(0, NOISE_SD, (b - a, b - a)))
    return pixels


@pytest.fixture
def phantom_study(facility: Facility, reader: User, e2e_storage: Path) -> Study:
    files = [
        _dataset(
            _phantom(),
            series_uid=generate_uid(),
            series_number=1,
            description="PHANTOM",
            PixelSpacing=[SPACING, SPACING],
            ImageOrientationPatient=AXIAL,
            ImagePositionPatient=[-64, -64, 0],
        )
    ]
    # A multi-frame cine at 50 ms a frame: 20 frames per second.
    frames = np.stack([np.full((32, 32), 10 * f) for f in range(5)])
    files.append(
        _dataset(
            frames,
            series_uid=generate_uid(),
            series_number=2,
            description="CINE",
            NumberOfFrames=5,
            FrameTime=50,
            FrameIncrementPointer=0x00181063,
        )
    )
    return _store(facility, reader, files)


def _volume_series(
    number: int, description: str, orientation: list[int], positions: list[list[float]]
) -> list[bytes]:
    uid = generate_uid()
    pixels = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.int16)
    return [
        _dataset(
            pixels,
            series_uid=uid,
            series_number=number,
            description=description,
            instance_number=n + 1,
            PixelSpacing=[2.5, 2.5],
            ImageOrientationPatient=orientation,
            ImagePositionPatient=position,
        )
        for n, position in enumerate(positions)
    ]


@pytest.fixture
def volume_study(facility: Facility, reader: User, e2e_storage: Path) -> Study:
    """One Frame of Reference, a cube of 160 mm from -80 to 80 on every axis: an axial series
    at 5 mm (z 0..45), a second axial at 3 mm (z 0..45), a sagittal and a coronal one."""
    files = _volume_series(1, "AXIAL 5MM", AXIAL, [[-80, -80, 5.0 * n] for n in range(10)])
    files += _volume_series(2, "AXIAL 3MM", AXIAL, [[-80, -80, 3.0 * n] for n in range(16)])
    files += _volume_series(3, "SAGITTAL", SAGITTAL, [[-10.0 + 5 * n, -80, 80] for n in range(5)])
    files += _volume_series(4, "CORONAL", CORONAL, [[-80, -10.0 + 5 * n, 80] for n in range(5)])
    return _store(facility, reader, files)


def _to_screen(page: Any, selector: str, x: float, y: float, size: int) -> tuple[float, float]:
    """Where image point (x, y) of a fitted, unrotated square image is on the page."""
    viewport = page.locator(selector)
    box = viewport.locator("canvas").bounding_box()
    scale = float(viewport.get_attribute("data-scale"))
    return (
        box["x"] + box["width"] / 2 + (x - size / 2) * scale,
        box["y"] + box["height"] / 2 + (y - size / 2) * scale,
    )


def _drag(page: Any, a: tuple[float, float], b: tuple[float, float]) -> None:
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=6)
    page.mouse.up()


def _markers(viewport: Any) -> dict[str, str]:
    return {
        side: str(viewport.locator(f".ov-mark-{side}").text_content())
        for side in ("left", "right", "top", "bottom")
    }


def _numbers(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(mean|SD|min|max|area) (-?[\d.]+)", text)}


# --- the pure maths, through Node ---------------------------------------------------------------

VIEWER_JS = Path(__file__).resolve().parents[2] / "static" / "js" / "viewer"
MATHS_CHECK = """
import * as g from "./geometry.js";
import * as m from "./measure.js";
import * as w from "./windowing.js";
const axial = { ipp: [-80, -80, 35], iop: [1, 0, 0, 0, 1, 0], ps: [2.5, 2.5], rows: 64, columns: 64 };
const sagittal = { ipp: [0, -80, 80], iop: [0, 1, 0, 0, 0, -1], ps: [2.5, 2.5], rows: 64, columns: 64 };
const c = Math.cos(Math.PI / 6), s = Math.sin(Math.PI / 6);
const values = new Int16Array(100).map((_, i) => i);
const stack = [0, 5, 10, 15].map((z) => ({ ...axial, ipp: [-80, -80, z] }));
console.log(JSON.stringify({
  letters: [g.orientationLetters([1, 0, 0]), g.orientationLetters([0, -1, 0]), g.orientationLetters([0, 0, 1])],
  oblique: g.orientationLetters([c, 0, s]),
  slight: g.orientationLetters([Math.cos(0.1), 0, Math.sin(0.1)]),
  sagittalMarkers: g.edgeMarkers(sagittal, (dx, dy) => [dx, dy]),
  flippedAxial: g.edgeMarkers(axial, (dx, dy) => [-dx, dy]),
  nearest: g.nearestSlice(stack, [0, 0, 11]),
  line: g.referenceLine(axial, sagittal),
  parallelLine: g.referenceLine(axial, stack[0]),
  angle: m.angleAt([10, 0], [0, 0], [0, 10]),
  cobb: m.cobbAngle([0, 0], [10, 0], [0, 0], [-10, 10]),
  rect: m.regionStats("rect", [2, 3], [5, 5], values, 10, 10),
  area: m.regionArea("ellipse", [0, 0], [20, 10], [0.5, 0.5]),
  drag: w.windowDragged({ min_value: -1024, max_value: 3071, dtype: "int16" }, [40, 80], 10, 0),
  auto: w.autoWindow({ kind: "grey" }, values),
}));
"""


def test_the_viewer_maths(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    for name in ("geometry.js", "measure.js", "windowing.js"):
        shutil.copy(VIEWER_JS / name, tmp_path / name)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "check.js").write_text(MATHS_CHECK)
    run = subprocess.run(  # noqa: S603 - our own script
        [node, "check.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    r = json.loads(run.stdout)
    assert r["letters"] == ["L", "A", "H"]
    assert r["oblique"] == "LH"  # 30° towards the head: a second letter
    assert r["slight"] == "L"  # 6°: not oblique enough for one
    assert r["sagittalMarkers"] == {"right": "P", "left": "A", "bottom": "F", "top": "H"}
    assert r["flippedAxial"] == {"right": "R", "left": "L", "bottom": "P", "top": "A"}
    assert r["nearest"] == 2  # z = 11 is nearest the slice at z = 10
    # z = 35 across the sagittal image: row (80 - 35) / 2.5 = 18, its centre at 18.5.
    assert r["line"] == pytest.approx([0, 18.5, 64, 18.5])
    assert r["parallelLine"] is None
    assert r["angle"] == pytest.approx(90)
    assert r["cobb"] == pytest.approx(45)
    # Pixels with centres inside x 2..5, y 3..5: columns 2, 3, 4 of rows 3 and 4.
    assert r["rect"] == {
        "mean": pytest.approx(38),
        "sd": pytest.approx((sum((v - 38) ** 2 for v in [32, 33, 34, 42, 43, 44]) / 6) ** 0.5),
        "min": 32,
        "max": 44,
        "count": 6,
    }
    assert r["area"] == pytest.approx(np.pi * 5 * 2.5)
    assert r["drag"][1] == pytest.approx(84)  # 10 px on W80: 4 HU
    assert r["auto"][1] == pytest.approx(98, abs=2)


# --- window/level, ROI, angles ------------------------------------------------------------------


def test_window_level_is_fine_and_whole_numbers(
    e2e_page: Any,
    e2e_js_errors: list[str],
    phantom_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
) -> None:
    page = e2e_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, phantom_study)
    _drawn(viewport, 0)
    expect(viewport.locator(".ov-window")).to_have_text("W: 80 L: 40")
    box = viewport.locator("canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    _drag(page, (x, y), (x + 10, y))
    text = str(viewport.locator(".ov-window").text_content())
    match = re.fullmatch(r"W: (\d+) L: (-?\d+)", text)
    assert match, text  # whole numbers, no decimals
    assert 80 < int(match.group(1)) <= 88, text  # a few HU for 10 px on a narrow window
    # A wide window moves faster for the same drag.
    page.keyboard.press("4")  # bone
    expect(viewport.locator(".ov-window")).to_have_text("W: 1800 L: 400")
    _drag(page, (x, y), (x + 10, y))
    wide = re.fullmatch(r"W: (\d+) L: (-?\d+)", str(viewport.locator(".ov-window").text_content()))
    assert wide and int(wide.group(1)) - 1800 >= 40
    # The CT presets of the menu.
    options = page.locator("#preset option")
    labels = " ".join(options.all_text_contents())
    for name in ("Brain", "Subdural", "Stroke", "Bone", "Lung", "Abdomen", "Liver", "Mediastinum"):
        assert name in labels
    page.select_option("#preset", "subdural")
    expect(viewport.locator(".ov-window")).to_have_text(re.compile(r"^W: \d+ L: \d+$"))
    _shot(page, artefacts, "01-window")
    assert e2e_js_errors == []


def test_roi_and_angle_measurements_read_the_known_values(
    e2e_page: Any,
    e2e_js_errors: list[str],
    phantom_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
) -> None:
    page = e2e_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, phantom_study)
    _drawn(viewport, 0)
    truth = _phantom()

    # A rectangle over image pixels 80..159 (80 x 80 px, 40 x 40 mm) inside the square.
    page.get_by_role("button", name="Rectangle").click()
    _drag(page, _to_screen(page, "#vp0", 80, 80, SIZE), _to_screen(page, "#vp0", 160, 160, SIZE))
    status = page.locator("#measurement")
    expect(status).to_have_text(re.compile(r"^Rectangle: mean"))
    values = _numbers(str(status.text_content()))
    inside = truth[80:160, 80:160].astype(float)
    assert values["mean"] == pytest.approx(inside.mean(), abs=0.6)
    assert values["SD"] == pytest.approx(inside.std(), abs=0.6)
    assert values["min"] == pytest.approx(inside.min(), abs=1)
    assert values["max"] == pytest.approx(inside.max(), abs=1)
    assert values["area"] == pytest.approx(1600, rel=0.03)
    assert "HU" in str(status.text_content()) and "mm²" in str(status.text_content())

    # An ellipse (a circle of radius 30 px = 15 mm) inside the square: mean 100, SD 10.
    page.get_by_role("button", name="Ellipse").click()
    _drag(page, _to_screen(page, "#vp0", 98, 98, SIZE), _to_screen(page, "#vp0", 158, 158, SIZE))
    expect(status).to_have_text(re.compile(r"^Ellipse: mean"))
    values = _numbers(str(status.text_content()))
    assert values["mean"] == pytest.approx(100, abs=1.5)
    assert values["SD"] == pytest.approx(NOISE_SD, abs=1.0)
    assert values["area"] == pytest.approx(np.pi * 15**2, rel=0.03)

    # An angle of 45° by three clicks: an arm along x, the vertex, an arm along the diagonal.
    page.get_by_role("button", name="Angle", exact=True).click()
    for point in ((200, 60), (60, 60), (160, 160)):
        page.mouse.click(*_to_screen(page, "#vp0", *point, SIZE))
    expect(status).to_have_text(re.compile(r"^Angle: "))
    assert float(re.findall(r"[\d.]+", str(status.text_content()))[0]) == pytest.approx(45, abs=0.5)

    # A Cobb angle between a horizontal line and one 30° off it.
    page.get_by_role("button", name="Cobb").click()
    _drag(page, _to_screen(page, "#vp0", 40, 220, SIZE), _to_screen(page, "#vp0", 120, 220, SIZE))
    dx, dy = 80 * np.cos(np.radians(30)), 80 * np.sin(np.radians(30))
    _drag(
        page,
        _to_screen(page, "#vp0", 140, 230, SIZE),
        _to_screen(page, "#vp0", 140 + dx, 230 - dy, SIZE),
    )
    expect(status).to_have_text(re.compile(r"^Cobb angle: "))
    assert float(re.findall(r"[\d.]+", str(status.text_content()))[0]) == pytest.approx(30, abs=0.7)

    # An arrow, and the side panel that lists all five with a delete button each.
    page.get_by_role("button", name="Arrow").click()
    _drag(page, _to_screen(page, "#vp0", 20, 20, SIZE), _to_screen(page, "#vp0", 60, 60, SIZE))
    page.get_by_role("button", name="Results").click()
    items = page.locator("#measure-list li")
    expect(items).to_have_count(5)
    expect(items.nth(0)).to_contain_text("Rectangle")
    expect(items.nth(4)).to_contain_text("Arrow")
    _shot(page, artefacts, "01-measurements")
    items.nth(4).get_by_role("button", name="Delete").click()
    expect(items).to_have_count(4)
    assert e2e_js_errors == []


def test_tag_browser_cine_rate_and_save_picture(
    e2e_page: Any,
    e2e_js_errors: list[str],
    phantom_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
    tmp_path: Path,
) -> None:
    page = e2e_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, phantom_study)
    _drawn(viewport, 0)

    page.get_by_role("button", name="Tags").click()
    panel = page.locator("#tag-panel")
    expect(panel).to_be_visible()
    expect(panel.locator("tbody tr").first).to_be_visible(timeout=LOAD_TIMEOUT)
    page.fill("#tag-filter", "PixelSpacing")
    row = panel.locator("tbody tr:visible")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("(0028,0030)")
    expect(row).to_contain_text("DS")
    expect(row).to_contain_text("0.5")
    page.fill("#tag-filter", "7FE0")
    expect(panel.locator("tbody tr:visible")).to_have_count(0)  # no pixel data
    _shot(page, artefacts, "01-tags")
    page.get_by_role("button", name="Tags").click()

    # The cine series: its rate comes from Frame Time (50 ms).
    page.locator(".thumb").nth(1).click()
    expect(viewport.locator(".ov-series")).to_contain_text("CINE")
    expect(page.locator("#fps")).to_have_value("20")

    # Save picture: a PNG of the view with the "not for diagnosis" band burned in.
    page.locator(".thumb").nth(0).click()
    _drawn(viewport, 0)
    with page.expect_download() as info:
        page.locator(".vtools").get_by_role("button", name="Save picture").click()
    download = info.value
    assert download.suggested_filename.endswith(".png")
    assert "DEMO" not in download.suggested_filename.upper()
    path = artefacts / "02-saved-picture.png"
    download.save_as(path)
    _assert_not_for_diagnosis_band(path)
    assert e2e_js_errors == []


def _assert_not_for_diagnosis_band(path: Path) -> None:
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height = image.shape[0]
    band = image[int(height * 0.93) :, :, :]
    # The band is dark red with white letters: both colours fill a good part of it.
    red = (band[:, :, 0] > 140) & (band[:, :, 1] < 40) & (band[:, :, 2] < 60)
    white = (band > 220).all(axis=2)
    assert red.mean() > 0.4, red.mean()
    assert white.mean() > 0.01, white.mean()


# --- orientation, layouts, sync, reference lines ------------------------------------------------


def test_orientation_markers_layouts_sync_and_reference_lines(
    e2e_page: Any,
    e2e_js_errors: list[str],
    volume_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
) -> None:
    page = e2e_page
    _sign_in(page, reader, live_server)
    vp0 = _open(page, live_server, volume_study)
    _drawn(vp0, 0)
    assert _markers(vp0) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    page.keyboard.press("h")  # flip horizontally: right and left change sides
    expect(vp0.locator(".ov-mark-left")).to_have_text("L")
    assert _markers(vp0) == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    page.keyboard.press("h")
    page.keyboard.press("r")  # 90° clockwise: the anterior side is now on the right
    expect(vp0.locator(".ov-mark-right")).to_have_text("A")
    assert _markers(vp0) == {"left": "P", "right": "A", "top": "R", "bottom": "L"}
    page.keyboard.press("Escape")
    page.keyboard.press("Escape")

    page.locator(".thumb").nth(2).click()
    _drawn(vp0, 0)
    expect(vp0.locator(".ov-mark-left")).to_have_text("A")
    assert _markers(vp0) == {"left": "A", "right": "P", "top": "H", "bottom": "F"}
    page.locator(".thumb").nth(3).click()
    _drawn(vp0, 0)
    expect(vp0.locator(".ov-mark-top")).to_have_text("H")
    assert _markers(vp0) == {"left": "R", "right": "L", "top": "H", "bottom": "F"}
    _shot(page, artefacts, "01-coronal-markers")

    # Every layout.
    for name, shown in (("1x1", 1), ("2x1", 2), ("2x2", 4), ("1x3", 3), ("1x2", 2)):
        page.locator(f"[data-layout='{name}']").click()
        expect(page.locator(".viewport:visible")).to_have_count(shown)
    # Each viewport gets its series from its own chooser: 5 mm axial left, 3 mm axial right.
    vp1 = page.locator("#vp1")
    page.select_option("#vp0 .vp-series", index=0)
    page.select_option("#vp1 .vp-series", index=1)
    _drawn(vp0, 0)
    _drawn(vp1, 0)
    expect(vp1.locator(".ov-series")).to_contain_text("AXIAL 3MM")
    expect(page.locator("#sync")).to_have_attribute("aria-pressed", "true")
    # Where each slice lies arrives after the first image (geometry.json).
    expect(page.locator("#viewer")).to_have_attribute("data-geometry", "ready")
    # Scrolling the left one to z = 30 takes the right one to its slice at z = 30.
    page.locator("#vp0 canvas").click()
    for _ in range(6):
        page.keyboard.press("ArrowDown")
    _drawn(vp0, 6)
    expect(vp0).to_have_attribute("data-slice-position", "30")
    expect(vp1).to_have_attribute("data-slice-position", "30")
    expect(vp1).to_have_attribute("data-image-index", "10")
    # Nearest, not equal: z = 35 on the left is 36 (index 12) on the right.
    page.keyboard.press("ArrowDown")
    expect(vp1).to_have_attribute("data-image-index", "12")
    _shot(page, artefacts, "02-synced")

    # The sagittal series on the right, reference lines on: the left's axial slice (z = 35)
    # is a horizontal line across the sagittal image at row (80 - 35) / 2.5 = 18 (centre 18.5).
    page.select_option("#vp1 .vp-series", index=2)
    _drawn(vp1, 0)
    page.locator("#reflines").click()
    expect(page.locator("#reflines")).to_have_attribute("aria-pressed", "true")
    page.locator("#vp0 canvas").click()
    expect(vp1).not_to_have_attribute("data-reference-line", "")
    line = [float(v) for v in str(vp1.get_attribute("data-reference-line")).split()]
    x1, y1, x2, y2 = line
    assert y1 == pytest.approx(18.5, abs=0.1) and y2 == pytest.approx(18.5, abs=0.1), line
    assert sorted([x1, x2]) == pytest.approx([0, 64], abs=0.1), line
    _shot(page, artefacts, "03-reference-line")
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


def test_on_a_phone_markers_window_and_a_touch_rectangle(
    phone_page: Any,
    e2e_js_errors: list[str],
    phantom_study: Study,
    reader: User,
    live_server: Any,
    artefacts: Path,
) -> None:
    page = phone_page
    _sign_in(page, reader, live_server)
    viewport = _open(page, live_server, phantom_study)
    _drawn(viewport, 0)
    assert _markers(viewport) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    expect(viewport.locator(".ov-window")).to_have_text("W: 80 L: 40")
    page.locator("[data-tool='rect']").click()
    touch = _Touch(page)
    a = _to_screen(page, "#vp0", 80, 80, SIZE)
    b = _to_screen(page, "#vp0", 160, 160, SIZE)
    touch.move([a], [b])
    status = page.locator("#measurement")
    expect(status).to_have_text(re.compile(r"^Rectangle: mean"))
    values = _numbers(str(status.text_content()))
    assert values["mean"] == pytest.approx(_phantom()[80:160, 80:160].mean(), abs=1.0)
    wide = page.evaluate(
        """() => [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > 391).map((e) => e.tagName + '.' + e.className + '#' + e.id).slice(0, 8)"""
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, wide
    _shot(page, artefacts, "01-phone-rectangle")
    assert e2e_js_errors == []


# --- patients -----------------------------------------------------------------------------------


@pytest.fixture
def patient_token(phantom_study: Study, reader: User) -> str:
    _, token = share_create(
        facility=phantom_study.facility,
        created_by=reader,
        studies=[phantom_study],
        kind="patient",
        second_factor="birth_date",
        can_download=False,
    )
    assert token is not None
    return token


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_a_patient_gets_the_simple_mode_and_saves_a_picture(
    e2e_browser: Any,
    e2e_js_errors: list[str],
    phantom_study: Study,
    patient_token: str,
    live_server: Any,
    artefacts: Path,
    tmp_path: Path,
    size: str,
) -> None:
    options: dict[str, Any] = (
        {"viewport": {"width": 1280, "height": 900}}
        if size == "desktop"
        else {
            "viewport": {"width": 390, "height": 844},
            "has_touch": True,
            "is_mobile": True,
            "device_scale_factor": 2,
        }
    )
    context = e2e_browser.new_context(**options)
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("pageerror", lambda error: e2e_js_errors.append(str(error)))
    try:
        page.goto(f"{live_server.url}/p/{patient_token}/")
        page.fill("input[name=birth_date]", "1961-04-12")
        page.get_by_role("button", name="Open").click()
        page.goto(f"{live_server.url}/p/{patient_token}/studies/{phantom_study.uuid}/view/")
        viewport = page.locator("#vp0")
        _drawn(viewport, 0)
        simple = page.locator("#simple-bar")
        for name in ("Zoom in", "Zoom out", "Brighter", "Darker", "Full screen", "Save picture"):
            expect(simple.get_by_role("button", name=name)).to_be_visible()
        # The radiologist's toolbar waits behind "More tools".
        expect(page.locator(".vtools")).to_be_hidden()
        scale = float(viewport.get_attribute("data-scale"))
        simple.get_by_role("button", name="Zoom in").click()
        expect(viewport).not_to_have_attribute("data-scale", str(scale))
        center = float(viewport.get_attribute("data-window-center"))
        simple.get_by_role("button", name="Brighter").click()
        expect(viewport).not_to_have_attribute("data-window-center", str(int(center)))
        assert float(viewport.get_attribute("data-window-center")) < center
        _shot(page, artefacts, f"01-patient-simple-{size}")
        with page.expect_download() as info:
            simple.get_by_role("button", name="Save picture").click()
        path = artefacts / f"02-patient-saved-picture-{size}.png"
        info.value.save_as(path)
        _assert_not_for_diagnosis_band(path)
        simple.get_by_role("button", name="More tools").click()
        expect(page.locator(".vtools")).to_be_visible()
    finally:
        context.close()
    assert e2e_js_errors == []
