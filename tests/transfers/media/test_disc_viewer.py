"""The viewer on every ZIP and disc: INDEX.HTM and VIEWER/ open from a file:// address in
Chromium, with no server and no network, and draw the images with their own values."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pycdlib
import pydicom
import pytest
from django.contrib.staticfiles import finders
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, generate_uid

from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.helpers import dicom_bytes, peer_missing, upload
from transfers.media import disc_viewer
from transfers.media.export import export_plan, iso_build, zip_size, zip_stream
from transfers.models import Instance, Study

pytestmark = pytest.mark.django_db

ROWS, COLUMNS = 32, 40
# Window center 103.5, width 255 over HU: grey level = HU + 24, one level per HU.
WINDOW = (103.5, 255.0)
PATIENT = "O'Brien^Mary"


def _stored_values(base: int) -> np.ndarray:
    """Stored values base + 3 * row + column; with the intercept of -1024 the HU are
    base - 1024 + 3 * row + column, and the grey level in WINDOW is base - 1000 + 3*row + col."""
    rows, columns = np.mgrid[0:ROWS, 0:COLUMNS]
    return (base + 3 * rows + columns).astype(np.int16)


def _grey(base: int) -> list[list[int]]:
    return (_stored_values(base).astype(int) - 1000).tolist()


def _image(
    base: int, *, study_uid: str, series_uid: str, number: int, compressed: bool = False
) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2 if compressed else 1
    ds.SeriesDescription = "J2K" if compressed else "PLAIN"
    ds.InstanceNumber = number
    ds.PatientName = PATIENT
    ds.StudyDate = "20240115"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = WINDOW
    ds.PixelData = _stored_values(base).tobytes()
    if compressed:
        ds.compress(JPEG2000Lossless)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def study(client: Any, bob_token: str) -> Study:
    """Series 1: three native slices (grey levels from 0, 20, 40 up); series 2: two slices
    compressed with lossless JPEG 2000 (from 100 and 120 up)."""
    study_uid = generate_uid()
    plain, compressed = generate_uid(), generate_uid()
    for number, base in enumerate((1000, 1020, 1040), start=1):
        data = _image(base, study_uid=study_uid, series_uid=plain, number=number)
        assert upload(client, data, token=bob_token).status_code == 201
    for number, base in enumerate((1100, 1120), start=1):
        data = _image(
            base, study_uid=study_uid, series_uid=compressed, number=number, compressed=True
        )
        assert upload(client, data, token=bob_token).status_code == 201
    made = Study.objects.get(study_instance_uid=study_uid)
    syntaxes = set(
        Instance.objects.filter(series__study=made).values_list("transfer_syntax_uid", flat=True)
    )
    assert JPEG2000Lossless in syntaxes
    return made


def _owner_reports(study: Study) -> list[Any]:
    return []


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        peer_missing(f"{CHROMIUM} is not installed (Debian package 'chromium')")
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield launched
            launched.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


CANVAS = "#image"


def _drawn(page: Any, series: int, index: int) -> None:
    page.wait_for_selector(f'{CANVAS}[data-drawn="S{series:07d}:{index}"][data-state="drawn"]')


def _pixels(page: Any) -> list[list[int]]:
    """The red channel of the canvas the disc viewer draws into, row by row."""
    return page.evaluate(
        """() => {
            const canvas = document.querySelector("#image");
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            const rows = [];
            for (let y = 0; y < canvas.height; y += 1) {
                const row = [];
                for (let x = 0; x < canvas.width; x += 1) row.push(data[(y * canvas.width + x) * 4]);
                rows.push(row);
            }
            return rows;
        }"""
    )


def _open_and_look(browser: Any, root: Path) -> None:
    """What a recipient does: open INDEX.HTM, see whose images, open the viewer, scroll."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto((root / "INDEX.HTM").as_uri())
        assert page.locator("[data-patient]").inner_text() == "O'Brien, Mary"
        body = page.locator("body").inner_text()
        assert "2024-01-15" in body and "Not for diagnosis" in body
        assert "Series 1 \u00b7 CT \u00b7 PLAIN (3 images)" in body

        page.click("#open-viewer")
        _drawn(page, 1, 0)  # the first image of the first series, at once
        assert _pixels(page) == _grey(1000)
        assert page.get_attribute(CANVAS, "data-count") == "3"
        assert "Not for diagnosis" in page.locator("footer").inner_text()

        page.keyboard.press("ArrowDown")
        _drawn(page, 1, 1)
        assert _pixels(page) == _grey(1020)
        page.hover(CANVAS)
        page.mouse.wheel(0, 120)
        _drawn(page, 1, 2)
        assert _pixels(page) == _grey(1040)
        page.click("#prev")
        _drawn(page, 1, 1)

        # Window by drag: to the right widens the window, so the image loses contrast.
        box = page.locator(CANVAS).bounding_box()
        assert box is not None
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 100, y, steps=4)
        page.mouse.up()
        assert float(page.get_attribute(CANVAS, "data-window-width") or 0) > WINDOW[1]
        assert _pixels(page) != _grey(1020)

        # The JPEG 2000 series, decoded at export time, from the series list.
        page.click('#series-list button[data-series="2"]')
        _drawn(page, 2, 0)
        assert _pixels(page) == _grey(1100)
        page.click("#next")
        _drawn(page, 2, 1)
        assert _pixels(page) == _grey(1120)
    finally:
        context.close()
    assert errors == []
    assert requests and all(url.startswith("file://") for url in requests), requests


# --- the ZIP and the disc image in Chromium ----------------------------------------------------


def test_the_unzipped_download_opens_in_a_browser_from_file_urls(study, browser, tmp_path):
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    data = b"".join(zip_stream(plan))
    assert zip_size(plan) == len(data)
    root = tmp_path / "unzipped"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names[:3] == ["README.TXT", "DICOMDIR", "INDEX.HTM"]
        assert {"VIEWER/VIEWER.HTM", "VIEWER/WINDOW.JS", "VIEWER/VIEWER.JS"} <= set(names)
        assert sum(1 for n in names if n.startswith("VIEWER/DATA/")) == 5
        archive.extractall(root)
    # The DICOM part of the medium is as before: the images byte for byte.
    for media_file in plan.studies[0].instances:
        stored = Instance.objects.get(storage_key=media_file.storage_key)
        assert (root / media_file.path).stat().st_size == stored.size_bytes
    _open_and_look(browser, root)


def test_the_disc_image_opens_the_same_way_with_its_iso_9660_names(study, browser, tmp_path):
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    target = tmp_path / "study.iso"
    with target.open("wb") as out:
        iso_build(plan, out=out)
    # Extracted through the plain ISO 9660 level 1 names ("INDEX.HTM;1"), what a reader
    # without Joliet sees: the viewer's files are 8.3 names like the rest of the medium.
    root = tmp_path / "disc"
    iso = pycdlib.PyCdlib()
    iso.open(str(target))
    try:
        for dirname, _, filenames in iso.walk(iso_path="/"):
            for name in filenames:
                plain = name.removesuffix(";1").rstrip(".")
                assert re.match(r"^[A-Z0-9_]{1,8}(\.[A-Z0-9_]{1,3})?$", plain), name
                path = root / dirname.lstrip("/") / plain
                path.parent.mkdir(parents=True, exist_ok=True)
                iso.get_file_from_iso(str(path), iso_path=f"{dirname.rstrip('/')}/{name}")
    finally:
        iso.close()
    for path in root.rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)  # as read-only as a disc
    try:
        _open_and_look(browser, root)
    finally:
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)


# --- what the files hold --------------------------------------------------------------------


def test_the_contents_page_names_the_patient_and_needs_nothing_but_the_files(study):
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    files = {f.path: f for f in plan.viewer}
    index = files["INDEX.HTM"].data.decode()
    assert "O&#x27;Brien, Mary" in index
    assert "VIEWER/VIEWER.HTM#series=2" in index
    for media_file in plan.viewer:
        text = media_file.data.decode()
        assert "http://" not in text and "https://" not in text, media_file.path
        assert "fetch(" not in text and "import " not in text, media_file.path
    # README.TXT points to it, and still names no patient.
    assert b"open INDEX.HTM in any web browser" in plan.readme.data
    assert b"O'Brien" not in plan.readme.data


def test_frame_files_have_the_length_planned_whatever_the_image_turns_out_to_be(study):
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    assert len(plan.frames) == 5
    for media_file in plan.frames:
        assert media_file.produce is not None
        assert len(media_file.produce()) == media_file.size
    # A broken stored image becomes a frame that says why, of the same length.
    instance = Instance.objects.filter(series__study=study).order_by("instance_number").first()
    assert instance is not None
    image = disc_viewer.ViewerImage(instance=instance, series_key="S0000001", frame=0, number=1)
    instance.rows = ROWS + 1  # the index no longer matches the file
    made = disc_viewer.frame_script(image)
    assert len(made) == disc_viewer.frame_file_size(ROWS + 1, COLUMNS)
    assert b'"error":"This image is not the size its index says"' in made


FRAME_CALL = re.compile(
    rb'^RelayDisc\.frame\("(S\d{7})",(\d+),(\{.*?\}),"([A-Za-z0-9+/=]*)"\);\n *$'
)


def test_each_frame_of_a_multi_frame_image_gets_its_own_file_with_its_values(client, bob_token):
    data = dicom_bytes("emri_small.dcm", PatientName=PATIENT, StudyDate="20240115")
    assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get()
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array  # 10 frames of 64 x 64
    assert [f.path for f in plan.frames] == [
        f"VIEWER/DATA/S0000001/F{n:07d}.JS" for n in range(1, 11)
    ]
    for number, media_file in enumerate(plan.frames):
        assert media_file.produce is not None
        match = FRAME_CALL.match(media_file.produce())
        assert match is not None
        meta = json.loads(match.group(3))
        assert (match.group(1), int(match.group(2)), meta["frame"]) == (
            b"S0000001",
            number,
            number,
        )
        codes = np.frombuffer(base64.b64decode(match.group(4)), dtype="<u2")
        values = codes.astype(np.int64) * meta["scale"] + int(meta["offset"])
        assert values.reshape(64, 64).tolist() == expected[number].tolist()


def test_large_frames_are_subsampled_to_a_screen_and_sized_from_the_index():
    assert disc_viewer.display_size(512, 512) == (512, 512, 1)
    assert disc_viewer.display_size(4096, 3328) == (1024, 832, 4)
    assert disc_viewer.frame_file_size(512, 512) == 1024 + 4 * -(-512 * 512 * 2 // 3)


def test_values_too_wide_for_16_bits_are_mapped_back_linearly():
    wide = np.array([[-100000, 0], [100000, 50]], dtype=np.int32)
    payload, encoding = disc_viewer._encode(wide, "gray")
    codes = np.frombuffer(payload, dtype="<u2").reshape(2, 2)
    restored = codes * encoding["scale"] + encoding["offset"]
    assert encoding["encoding"] == "float"
    assert np.allclose(restored, wide, atol=encoding["scale"])
    exact = np.array([[-1024, 3071]], dtype=np.int16)
    payload, encoding = disc_viewer._encode(exact, "gray")
    codes = np.frombuffer(payload, dtype="<u2")
    assert encoding == {"encoding": "int", "offset": -1024.0, "scale": 1, "dtype": "int32"}
    assert (codes + encoding["offset"]).tolist() == [-1024, 3071]


# --- the web viewer's maths as a classic script -------------------------------------------------


def test_es_modules_become_one_classic_script():
    first = (
        "export const A = 1;\nexport function twice(x) {\n  return 2 * x;\n}\nconst hidden = 3;\n"
    )
    second = (
        'import { A, twice } from "./first.js";\n'
        "class Box {}\n"
        "export { Box };\n"
        "export async function later() { return twice(A); }\n"
    )
    bundle = disc_viewer.classic_bundle([first, second], global_name="Both")
    assert not re.search(r"^\s*(import|export)\b", bundle, re.M)
    assert bundle.startswith("//") and "(function () {" in bundle
    assert "window.Both = Object.freeze({ A: A, twice: twice, Box: Box, later: later });" in bundle
    for bad in (
        "export default function f() {}",
        'import * as all from "./x.js";',
        'import { a as b } from "./x.js";\nexport const c = b;',
        'import { elsewhere } from "./x.js";\nexport const c = elsewhere;',
    ):
        with pytest.raises(ValueError):
            disc_viewer.classic_bundle([bad], global_name="X")


def test_the_bundled_windowing_is_the_web_viewers_and_runs_as_a_classic_script(tmp_path):
    source = Path(finders.find("js/viewer/windowing.js") or "")
    bundle = disc_viewer.shared_bundle().decode()
    for name in re.findall(r"^export (?:function|const|class) (\w+)", source.read_text(), re.M):
        assert f"{name}: {name}" in bundle
    node = "/usr/bin/node"
    if not os.path.exists(node):
        pytest.skip("node is not installed")
    script = tmp_path / "check.js"
    script.write_text(
        "globalThis.window = globalThis;\n" + bundle + "\nconst out = new Uint32Array(3);\n"
        "const meta = {kind: 'gray', dtype: 'int32', min_value: -24, max_value: 231};\n"
        "RelayWindowing.windowPixels(out, meta, new Int32Array([-24, 76, 231]), 103.5, 255, false);\n"
        "console.log(JSON.stringify(Array.from(out, (v) => v & 255)));\n"
    )
    result = subprocess.run([node, str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [0, 100, 255]


def test_a_disc_the_viewer_would_overfill_keeps_the_images_and_drops_the_viewer(
    study, bob, monkeypatch
):
    import transfers.media.discs as discs
    import transfers.media.export as export
    from transfers.media.export import iso_size
    from transfers.models import ExportStatus, MediaExport

    plan = export_plan(studies=[study], reports_of=_owner_reports)
    bare = plan.without_viewer()
    assert bare.viewer == bare.frames == [] and bare.images == plan.images
    assert b"INDEX.HTM" not in bare.readme.data
    assert bare.total_bytes == sum(f.size for f in bare.files) < plan.total_bytes
    # A "DVD" that holds the images but not the images and their viewer.
    capacity = iso_size(bare)
    assert iso_size(plan) > capacity
    monkeypatch.setattr(discs, "DVD_BYTES", capacity)
    monkeypatch.setattr(export, "DVD_BYTES", capacity)
    made = discs.media_build(export=MediaExport.objects.create(study=study, requested_by=bob))
    assert made.status == ExportStatus.READY and made.total_bytes == capacity


def test_memory_stays_flat_while_a_larger_study_streams(client, bob_token):
    """Forty 512 x 512 slices: 20 MB of DICOM and 28 MB of viewer frames go out, and the
    export never holds more than a few frames' worth (tracemalloc sees numpy's buffers too)."""
    import tracemalloc

    study_uid, series_uid = generate_uid(), generate_uid()
    for number in range(1, 41):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = number
        ds.Rows = ds.Columns = 512
        rng = np.random.default_rng(number)
        ds.PixelData = rng.integers(0, 3000, (512, 512), dtype=np.int16).tobytes()
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        assert upload(client, out.getvalue(), token=bob_token).status_code == 201
    study = Study.objects.get(study_instance_uid=study_uid)
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    assert sum(f.size for f in plan.frames) > 25_000_000

    tracemalloc.start()
    try:
        sent = sum(len(chunk) for chunk in zip_stream(plan))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent > plan.total_bytes > 45_000_000
    assert peak < 12_000_000, peak
