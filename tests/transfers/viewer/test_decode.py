"""Pixel decoding (transfers.viewer.decode) over every file of pydicom's test data and pydicom-data,
checked against pydicom's own reference decoding, lossless twins and crafted bad files."""

from __future__ import annotations

import io
import json
import os
import tracemalloc
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pydicom
import pytest
from pydicom.data import data_manager, get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

from transfers.viewer.decode import DecodeError, FrameData, frame_decode, frame_meta

warnings.filterwarnings("ignore", module="pydicom")

# Files that hold pixel data and are known not to decode, with the reason they must give. A file
# that decodes today and fails tomorrow is not in here, so the sweep catches it.
EXPECTED_FAILURES = {
    # A 12-bit JPEG Extended stream with a misplaced marker segment; only GDCM reads it, and GDCM
    # is not used (it can abort the process). JPGExtended.dcm is the same image, repaired.
    "JPEG-lossy.dcm": "JPEG decoder (pylibjpeg) failed",
    # The J2K fragment contains bytes that look like a sequence delimiter, so the codestream
    # read from the file is cut short.
    "JPEG2000-embedded-sequence-delimiter.dcm": "JPEG 2000 decoder (pylibjpeg) failed",
    # Its pixel data is 62 bytes short of 64 x 64 x 16 bits.
    "MR_truncated.dcm": "Rows x Columns x frames exceeds the pixel data",
    # Pixel Data with no Image Pixel module at all.
    "meta_missing_tsyntax.dcm": "The image has no Rows",
    "nested_priv_SQ.dcm": "The image has no Rows",
}
# Enhanced objects keep rescale in functional groups, which pydicom's apply_modality_lut does
# not read; their values are checked in test_it_uses_the_functional_groups_of_enhanced_ct.
FUNCTIONAL_GROUP_RESCALE = {"eCT_Supplemental.dcm"}
# pydicom's pixel_array cannot serve as the reference for these (it refuses Number of Frames
# "1A"; the other has no file meta, so no transfer syntax). They are still decoded and checked.
NO_REFERENCE = {"badVR.dcm", "OT-PAL-8-face.dcm"}


def _test_files() -> list[Path]:
    # get_testdata_files also tries to download a few files that neither pydicom nor
    # pydicom-data ship; without a network every attempt waits for its timeout (15 s in all).
    with mock.patch.object(data_manager, "online_test_file_dummy_paths", dict):
        names = get_testdata_files("*")
    return sorted((Path(n) for n in names if not os.path.isdir(n)), key=lambda p: p.name)


TEST_FILES = _test_files()


def _has_pixel_data(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=1024)
    except Exception:
        return False
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


IMAGE_FILES = [p for p in TEST_FILES if _has_pixel_data(p)]
OTHER_FILES = [p for p in TEST_FILES if p not in IMAGE_FILES]


def values(frame: FrameData) -> np.ndarray:
    arr = np.frombuffer(frame.data, dtype=np.dtype(frame.dtype).newbyteorder("<"))
    shape = (frame.rows, frame.columns, 3) if frame.kind == "rgb" else (frame.rows, frame.columns)
    return arr.reshape(shape)


def decoded(name: str, frame: int = 0) -> np.ndarray:
    return values(frame_decode(get_testdata_file(name), frame)).astype(np.float64)


def _reference(ds: Dataset, frame: int, kind: str) -> np.ndarray:
    """What pydicom itself makes of the frame, in the contract's units."""
    ref = pixel_array(ds, index=frame)
    if kind == "gray":
        return np.asarray(apply_modality_lut(ref, ds), dtype=np.float64)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        ref = apply_color_lut(ref, ds)
        return (ref >> 8 if ref.max() > 255 else ref).astype(np.float64)
    bits = ref.dtype.itemsize * 8
    return (ref[..., :3].astype(np.uint64) >> (bits - 8)).astype(np.float64)


def test_the_sweep_has_both_data_sets() -> None:
    names = {p.name for p in TEST_FILES}
    # One file from each package: without pydicom-data the sweep would quietly shrink by half.
    assert "CT_small.dcm" in names
    assert "US1_J2KR.dcm" in names
    assert len(IMAGE_FILES) > 120


def test_the_expected_failures_are_all_there() -> None:
    names = {p.name for p in IMAGE_FILES}
    assert set(EXPECTED_FAILURES) <= names


@pytest.mark.parametrize("path", IMAGE_FILES, ids=lambda p: p.name)
def test_it_decodes_every_image_or_says_why(path: Path) -> None:
    ds = pydicom.dcmread(path, force=True)
    raw_frames = str(ds.get("NumberOfFrames") or "1")
    frames = int(raw_frames) if raw_frames.isdigit() else 1
    if path.name in EXPECTED_FAILURES:
        with pytest.raises(DecodeError) as caught:
            frame_decode(path, 0)
        assert EXPECTED_FAILURES[path.name] in caught.value.reason
        return
    for frame in sorted({0, frames // 2, frames - 1}):
        result = frame_decode(path, frame)
        assert (result.rows, result.columns) == (ds.Rows, ds.Columns)
        photometric = str(ds.PhotometricInterpretation)
        expected_kind = "gray" if photometric.startswith("MONOCHROME") else "rgb"
        assert result.kind == expected_kind
        assert result.dtype in (
            ("uint8",) if expected_kind == "rgb" else ("int16", "uint16", "int32", "float32")
        )
        arr = values(result)
        assert np.isfinite(arr).all()
        assert result.min_value == arr.min() and result.max_value == arr.max()
        assert result.window_width > 0
        assert result.invert == (photometric == "MONOCHROME1")
        if path.name in FUNCTIONAL_GROUP_RESCALE | NO_REFERENCE:
            continue
        reference = _reference(ds, frame, result.kind)
        np.testing.assert_allclose(arr, reference, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("path", OTHER_FILES, ids=lambda p: p.name)
def test_it_refuses_files_without_pixels_with_a_reason(path: Path) -> None:
    with pytest.raises(DecodeError) as caught:
        frame_decode(path, 0)
    assert caught.value.reason.startswith(("No pixel data", "The DICOM file could not be read"))


def test_ct_values_are_hounsfield_units() -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    result = frame_decode(path, 0)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    assert float(ds.RescaleIntercept) != 0
    np.testing.assert_array_equal(values(result), expected)
    assert result.dtype == "int16"
    # Air around the phantom is about -1000 HU, not the stored value.
    assert result.min_value < -800
    meta = frame_meta(ds, 0)
    assert meta["units"] == "HU"
    assert meta["pixel_spacing"] == [0.661468, 0.661468]
    assert meta["spacing_kind"] == "PixelSpacing"
    assert meta["slice_location"] == pytest.approx(-77.2040634155)
    assert meta["instance_number"] == 1
    json.dumps(meta)


def test_it_takes_the_window_from_the_file() -> None:
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    result = frame_decode(get_testdata_file("RG3_UNCI.dcm"), 0)
    assert (result.window_center, result.window_width) == (
        float(ds.WindowCenter),
        float(ds.WindowWidth),
    )


def test_it_derives_a_window_from_the_data_when_the_file_has_none() -> None:
    result = frame_decode(get_testdata_file("CT_small.dcm"), 0)
    low = result.window_center - result.window_width / 2
    high = result.window_center + result.window_width / 2
    assert result.min_value <= low < high <= result.max_value


def test_monochrome1_is_inverted_and_monochrome2_is_not() -> None:
    assert frame_decode(get_testdata_file("RG3_UNCR.dcm"), 0).invert is True
    assert frame_decode(get_testdata_file("RG1_J2KR.dcm"), 0).invert is True
    assert frame_decode(get_testdata_file("MR_small.dcm"), 0).invert is False


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_lossless_encodings_equal_the_uncompressed_file(twin: str) -> None:
    np.testing.assert_array_equal(decoded(twin), decoded("MR_small.dcm"))


@pytest.mark.parametrize(
    "twin",
    [
        "emri_small_big_endian.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ],
)
def test_every_frame_of_a_multiframe_twin_is_equal(twin: str) -> None:
    frames = [decoded("emri_small.dcm", i) for i in range(10)]
    # Frames differ from each other, so a decoder stuck on frame 0 would fail.
    assert not np.array_equal(frames[0], frames[9])
    for i, expected in enumerate(frames):
        np.testing.assert_array_equal(decoded(twin, i), expected)


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("693_J2KR.dcm", "693_UNCR.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # YBR_RCT to RGB
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG lossless, RGB
        ("SC_rgb_expb.dcm", "SC_rgb.dcm"),
        ("SC_rgb_16bit.dcm", "SC_rgb.dcm"),
        ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),  # palette colour
        ("gdcm-US-ALOKA-16_big.dcm", "gdcm-US-ALOKA-16.dcm"),  # 16-bit palette, big endian
        ("rtdose_rle.dcm", "rtdose.dcm"),  # 32-bit
        ("liver_expb.dcm", "liver.dcm"),  # 1-bit segmentation
    ],
)
def test_lossless_pairs_decode_to_the_same_values(compressed: str, uncompressed: str) -> None:
    np.testing.assert_array_equal(decoded(compressed), decoded(uncompressed))


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # YBR_FULL_422
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",
        "SC_rgb_jpeg_lossy_gdcm.dcm",
        "SC_ybr_full_uncompressed.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
    ],
)
def test_ybr_and_lossy_colour_come_out_close_to_the_rgb_original(name: str) -> None:
    result = frame_decode(get_testdata_file(name), 0)
    assert result.kind == "rgb"
    difference = np.abs(values(result).astype(np.float64) - decoded("SC_rgb.dcm"))
    # Lossy and chroma-subsampled, so not equal; left in YCbCr it would be off by ~100.
    assert difference.mean() < 4


def test_j2k_ycbcr_ict_is_turned_into_rgb() -> None:
    difference = np.abs(decoded("US1_J2KI.dcm") - decoded("US1_UNCR.dcm"))
    assert difference.mean() < 3


def test_it_uses_the_functional_groups_of_enhanced_ct() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    stored = pixel_array(ds, index=1).astype(np.float64)
    result = frame_decode(path, 1)
    # Rescale Intercept -1024 lives in the shared functional groups only.
    np.testing.assert_array_equal(values(result), stored - 1024)
    first, second = frame_meta(ds, 0), frame_meta(ds, 1)
    assert first["units"] == "HU"
    assert first["pixel_spacing"] == [0.388672, 0.388672]
    assert first["slice_thickness"] == 10.0
    assert first["image_position"] != second["image_position"]


def test_it_decodes_deflated_files() -> None:
    result = frame_decode(get_testdata_file("image_dfl.dcm"), 0)
    assert (result.rows, result.columns, result.kind) == (512, 512, "gray")
    assert result.max_value > result.min_value


def test_it_accepts_bytes_paths_and_file_objects_alike() -> None:
    path = get_testdata_file("MR_small.dcm")
    data = Path(path).read_bytes()
    a = frame_decode(path, 0)
    assert frame_decode(data, 0) == a
    assert frame_decode(io.BytesIO(data), 0) == a


def test_float_pixel_data_is_float32() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    floats = np.linspace(-1.5, 2.5, 64 * 64, dtype="<f4").reshape(64, 64)
    del ds.PixelData
    ds.FloatPixelData = floats.tobytes()
    ds.BitsAllocated = 32
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    result = frame_decode(_saved(ds), 0)
    assert result.dtype == "float32"
    np.testing.assert_array_equal(values(result), floats)


def test_a_frame_index_out_of_range_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        frame_decode(get_testdata_file("emri_small.dcm"), 10)
    with pytest.raises(ValueError):
        frame_decode(get_testdata_file("CT_small.dcm"), -1)


def _saved(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _peak_bytes(fn: Any) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        error: BaseException | None = exc
    else:
        error = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return error, peak


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_a_file_claiming_65535_squared_pixels_is_refused_without_allocating(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Rows = ds.Columns = 65535
    data = _saved(ds)
    error, peak = _peak_bytes(lambda: frame_decode(data, 0))
    assert isinstance(error, DecodeError)
    assert "too large" in error.reason
    # 65535 x 65535 x 2 bytes would be 8 GiB.
    assert peak < 32 * 1024 * 1024


def test_a_native_file_claiming_more_frames_than_it_holds_is_refused() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = 1000
    data = _saved(ds)
    error, peak = _peak_bytes(lambda: frame_decode(data, 999))
    assert isinstance(error, DecodeError)
    assert error.reason.startswith("Rows x Columns x frames exceeds the pixel data")
    assert peak < 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("name", "decoder"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS decoder"),
        ("MR_small_jp2klossless.dcm", "JPEG 2000 decoder"),
        ("JPGExtended.dcm", "JPEG decoder"),
        ("MR_small_RLE.dcm", "RLE decoder"),
    ],
)
def test_garbage_in_a_compressed_frame_is_a_decode_error(name: str, decoder: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    rng = np.random.default_rng(4)
    garbage = b"\xff\xd8\xff" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([garbage])
    with pytest.raises(DecodeError) as caught:
        frame_decode(_saved(ds), 0)
    assert decoder in caught.value.reason


def test_an_unreadable_file_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as caught:
        frame_decode(b"DICM" * 3, 0)
    assert caught.value.reason
