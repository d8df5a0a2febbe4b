"""Pixel decoding for the viewer: one frame of a DICOM file as values after the modality LUT.

Pure functions over pydicom and numpy, no Django (the bounded reader in `transfers.dicomio`
takes its limits from the settings when there are any). The viewer applies the window in the browser,
so what leaves here is the frame's values after rescale (or the Modality LUT), the default window
and what the viewer needs to measure and label the frame (`frame_meta`).

Safety, because every file decoded here came from outside:
- every failure caused by the file is a `DecodeError` with a short reason a reader can be shown;
- before any pixel buffer is allocated, Rows x Columns is capped (`MAX_FRAME_PIXELS`,
  `MAX_FRAME_BYTES`) and, for native data, Rows x Columns x SamplesPerPixel x frames is checked
  against the length of the pixel data element as it is in the file;
- native pixel data is not read into memory: only the requested frame is read from the file;
- a deflated data set is inflated as a stream into a temporary file, within an absolute cap and
  a multiple of its compressed size (`transfers.dicomio`), and frames are read from that copy;
- only the decoders of pydicom itself, pylibjpeg (with its libjpeg, openjpeg and rle plugins) and
  Pillow are used. python-gdcm is never used, even if installed, because it can abort the whole
  process on malformed JPEG-LS.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

# numpy and pydicom are imported inside the functions that touch pixels or headers: the views
# import this module for its names, and a web worker serving pages loads no pixel code
# (tests/relay/test_lean_imports.py). Once loaded, such an import is a dictionary lookup.

from .. import dicomio

# 64 Mpx is larger than any single frame a facility sends (a full-field mammogram is ~14 Mpx, a
# whole-slide image is stored as small tiles), and a 65535 x 65535 claim is 4.3 Gpx.
MAX_FRAME_PIXELS = 64 * 1024 * 1024
# The decoded frame before any conversion: 64 Mpx of 16-bit grey, or ~85 Mpx of 8-bit RGB.
MAX_FRAME_BYTES = 256 * 1024 * 1024
# Elements larger than this stay in the file until needed; the native pixel data then never
# enters memory whole, only the frame asked for.
DEFER_BYTES = 256 * 1024
# Percentiles for a default window taken from the data: robust to the -2000 padding around a CT
# and to a few hot pixels.
WINDOW_PERCENTILES = (0.5, 99.5)
WINDOW_SAMPLE_PIXELS = 262_144

# In the order tried. Anything not listed (gdcm, pyjpegls) is never used.
ALLOWED_PLUGINS = ("pylibjpeg", "pydicom", "pillow")
PIXEL_KEYWORDS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
# Time limits must reach Celery, whatever a decoder was doing when they struck.
_PASS_THROUGH = (SoftTimeLimitExceeded, TimeLimitExceeded, KeyboardInterrupt, SystemExit)

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


class DecodeError(Exception):
    """A frame cannot be decoded; `reason` is short and can be shown to the reader.

    `lasting` is False when the failure may not happen again (out of memory under the worker's
    cap), so that a cached error is not kept for good.
    """

    def __init__(self, reason: str, *, lasting: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lasting = lasting


@dataclass(frozen=True)
class FrameData:
    rows: int
    columns: int
    kind: str  # "gray" or "rgb"
    dtype: str  # gray: int16 | uint16 | int32 | float32 (after the modality LUT); rgb: uint8
    data: bytes  # row-major, little-endian; rgb interleaved
    min_value: float
    max_value: float
    window_center: float
    window_width: float
    invert: bool  # MONOCHROME1 (or a MONOCHROME2 with an INVERSE presentation LUT)


# --- reading ------------------------------------------------------------------------------------


@contextmanager
def _opened(source: Source) -> Iterator[IO[bytes]]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as fp:
            yield fp
    else:
        yield source


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # pydicom's "exceptions were raised by all available plugins:" puts the cause on the next
    # line, after the plugin's name.
    if lines[0].endswith(":") and len(lines) > 1:
        return lines[1].split(": ", 1)[-1][:200]
    return lines[0][:200]


def dataset_read(fp: IO[bytes]) -> Dataset:
    """The dataset of an open DICOM file, its large values (the native pixel data) left in the
    file. The file must stay open while frames are decoded from the dataset.

    A deflated data set is inflated as a stream into a temporary file, refused beyond the
    bounds of `transfers.dicomio` (never inflated whole in memory as pydicom would)."""
    try:
        # A deflated data set is inflated within bounds into a temporary copy that becomes the
        # dataset's `buffer`: its deferred values and frames are read from there.
        ds, _ = dicomio.dataset_read(fp, defer_size=DEFER_BYTES, force=True)
    except _PASS_THROUGH:
        raise
    except DecodeError:
        raise
    except dicomio.InflateTooLarge as exc:
        raise DecodeError(exc.reason) from None
    except dicomio.Malformed as exc:
        raise DecodeError(f"The DICOM file could not be read: {exc.reason}") from None
    except MemoryError:
        raise DecodeError("Not enough memory to read the file", lasting=False) from None
    except RecursionError:
        raise DecodeError("The DICOM header nests sequences too deeply to be read") from None
    except Exception as exc:
        raise DecodeError(f"The DICOM file could not be read: {_short(exc)}") from None
    return ds


def _transfer_syntax(ds: Dataset) -> UID:
    from pydicom.uid import (
        UID,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    # No file meta (an old ACR-NEMA style file): the encoding pydicom found when reading it.
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


# --- the frame ----------------------------------------------------------------------------------


def frame_decode(source: Source, frame: int) -> FrameData:
    """Decode one frame (0-based) of a DICOM file given as a path, bytes or a binary file.

    Raises DecodeError for anything wrong with the file, ValueError for a negative frame index
    or one past the file's Number of Frames.
    """
    with _opened(source) as fp:
        ds = dataset_read(fp)
        return dataset_frame_decode(ds, fp, frame)


def number_of_frames(ds: Dataset) -> int:
    try:
        value = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        value = 1
    return max(value, 1)


def _pixel_keyword(ds: Dataset) -> str:
    for tag, keyword in PIXEL_KEYWORDS.items():
        if tag in ds._dict:
            return keyword
    kind = _object_kind(ds)
    if "Rows" in ds and "Columns" in ds:
        raise DecodeError(
            f"No pixel data in this {kind or 'image'} (the file may have been cut short)"
        )
    raise DecodeError(f"No pixel data ({kind})" if kind else "No pixel data")


def _object_kind(ds: Dataset) -> str:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

    sop_class = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get(
        "MediaStorageSOPClassUID"
    )
    try:
        name = UID(str(sop_class)).name if sop_class else ""
    except Exception:
        name = ""
    if name and name != str(sop_class):
        return name.removesuffix(" Storage")
    return str(ds.get("Modality") or "")


def _image_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword)
        if value in (None, ""):
            if default is None:
                raise DecodeError(f"The image has no {keyword}")
            return default
        return int(value)
    except DecodeError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise DecodeError(f"The image has an invalid {keyword}") from None


def dataset_frame_decode(ds: Dataset, fp: IO[bytes], frame: int) -> FrameData:
    """Decode one frame of a dataset read by `dataset_read` from the still-open `fp`."""
    from pydicom.pixels import apply_color_lut

    frames = number_of_frames(ds)
    if frame < 0 or frame >= frames:
        raise ValueError(f"frame {frame} is out of range (the image has {frames})")
    keyword = _pixel_keyword(ds)
    try:
        ts = _transfer_syntax(ds)
        if ts.is_deflated and getattr(ds, "buffer", None) is not None:
            fp = cast(IO[bytes], ds.buffer)  # the inflated copy `dataset_read` made
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
        arr, photometric = _decode(ds, fp, frame, keyword, ts, photometric)
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or arr.ndim == 3:
            return _rgb_frame(ds, arr)
        if photometric == "PALETTE COLOR":
            return _rgb_frame(ds, apply_color_lut(arr, ds), palette=True)
        if photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
            raise DecodeError(f"Photometric Interpretation {photometric} is not supported")
        return _gray_frame(ds, arr, frame, photometric)
    except _PASS_THROUGH:
        raise
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("Not enough memory to decode this frame", lasting=False) from None
    except Exception as exc:
        raise DecodeError(f"The pixel data could not be decoded: {_short(exc)}") from None


def _frame_sizes_check(ds: Dataset, keyword: str) -> tuple[int, int, int, int]:
    rows = _image_int(ds, "Rows")
    columns = _image_int(ds, "Columns")
    samples = _image_int(ds, "SamplesPerPixel", 1)
    bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword) or _image_int(
        ds, "BitsAllocated"
    )
    if rows <= 0 or columns <= 0:
        raise DecodeError(f"The image is {rows} x {columns} pixels")
    if samples not in (1, 3):
        raise DecodeError(f"{samples} samples per pixel is not supported")
    if bits not in (1, 8, 16, 32, 64):
        raise DecodeError(f"{bits} bits allocated is not supported")
    if rows * columns > MAX_FRAME_PIXELS:
        raise DecodeError(
            f"The frame is too large to display ({rows} x {columns} pixels; "
            f"the limit is {MAX_FRAME_PIXELS // (1024 * 1024)} Mpx)"
        )
    if rows * columns * samples * max(bits // 8, 1) > MAX_FRAME_BYTES:
        raise DecodeError(
            f"The frame is too large to decode ({rows} x {columns} x {samples} x {bits} bits)"
        )
    return rows, columns, samples, bits


def _native_length_expected(ds: Dataset, rows: int, columns: int, samples: int, bits: int) -> int:
    pixels = rows * columns * samples * number_of_frames(ds)
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")).startswith("YBR_FULL_422"):
        pixels = pixels * 2 // 3  # chroma subsampled 2:1 horizontally
    return (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)


def _decode(
    ds: Dataset, fp: IO[bytes], frame: int, keyword: str, ts: UID, photometric: str
) -> tuple[np.ndarray, str]:
    """The frame as pydicom decodes it (YBR_FULL and YBR_FULL_422 turned into RGB, J2K's
    YBR_ICT / YBR_RCT come out as RGB), and its photometric interpretation after decoding."""
    from pydicom.pixels import get_decoder

    rows, columns, samples, bits = _frame_sizes_check(ds, keyword)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DecodeError(f"{ts.name or ts} is not supported by the viewer") from None
    raw = ds.get_item(keyword, keep_deferred=True)
    options: dict[str, Any] = {
        **_pixel_options(ds),
        "transfer_syntax_uid": ts,
        # The header's frame count is the one the index and the viewer use.
        "allow_excess_frames": False,
        "pixel_keyword": keyword,
    }
    if raw is not None and raw.VR:
        options["pixel_vr"] = str(raw.VR)
    if decoder.is_native:
        length = _element_length(raw)
        expected = _native_length_expected(ds, rows, columns, samples, bits)
        if length < expected:
            frames = number_of_frames(ds)
            raise DecodeError(
                f"Rows x Columns x frames exceeds the pixel data ({rows} x {columns} x {frames} "
                f"needs {expected} bytes, the file holds {length})"
            )
    elif _element_length(raw) == 0:
        raise DecodeError("The compressed pixel data is empty")

    plugins = [p for p in ALLOWED_PLUGINS if p in decoder.available_plugins]
    if not decoder.is_native and not plugins:
        missing = "; ".join(decoder.missing_dependencies) or "no decoder installed"
        raise DecodeError(f"No decoder for {ts.name} is available ({missing})")
    failures: list[str] = []
    for plugin in plugins or [""]:
        try:
            arr, properties = _decode_with(fp, raw, decoder, frame, plugin, options)
        except _PASS_THROUGH:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            failures.append(f"{_decoder_label(ts, plugin)} failed: {_short(exc)}")
            continue
        return arr, str(properties.get("photometric_interpretation") or photometric).upper()
    raise DecodeError("; ".join(failures)[:400])


PIXEL_OPTIONS = {
    "SamplesPerPixel": "samples_per_pixel",
    "PhotometricInterpretation": "photometric_interpretation",
    "PlanarConfiguration": "planar_configuration",
    "Rows": "rows",
    "Columns": "columns",
    "BitsAllocated": "bits_allocated",
    "BitsStored": "bits_stored",
    "PixelRepresentation": "pixel_representation",
}


def _pixel_options(ds: Dataset) -> dict[str, Any]:
    """pydicom's decoding options from the header, like `as_pixel_options` but with a
    malformed Number of Frames ("1A") taken as 1 rather than failing."""
    options: dict[str, Any] = {
        option: ds[keyword].value for keyword, option in PIXEL_OPTIONS.items() if keyword in ds
    }
    options["number_of_frames"] = number_of_frames(ds)
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        options["extended_offsets"] = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return options


def _element_length(raw: Any) -> int:
    if raw is None:
        return 0
    value = raw.value
    if value is None:  # deferred: still in the file
        return int(raw.length)
    if isinstance(value, bytes | bytearray):
        return len(value)
    return int(getattr(raw, "length", 0) or 0)


def _decode_with(
    fp: IO[bytes],
    raw: Any,
    decoder: Any,
    frame: int,
    plugin: str,
    options: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    if raw.value is None:
        # Native data left in the file: pydicom reads only this frame from the value's start.
        fp.seek(raw.value_tell)
        src: Any = fp
    else:
        # The value itself rather than the dataset, so that pydicom works from `options`
        # (where a malformed Number of Frames is already mended), not from the raw header.
        src = raw.value
    arr, properties = decoder.as_array(
        src, index=frame, validate=True, raw=False, decoding_plugin=plugin, **options
    )
    return arr, properties


def _decoder_label(ts: UID, plugin: str) -> str:
    if not ts.is_encapsulated:
        return "The native decoder"
    family = (
        "JPEG-LS"
        if "JPEG-LS" in ts.name
        else "JPEG 2000"
        if "2000" in ts.name
        else "RLE"
        if "RLE" in ts.name
        else "JPEG"
        if "JPEG" in ts.name
        else ts.name
    )
    return f"{family} decoder ({plugin})" if plugin else f"{family} decoder"


# --- grey ---------------------------------------------------------------------------------------


def _functional_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The first item of `sequence` for this frame in an enhanced (multi-frame) object: the
    per-frame functional group wins over the shared one."""
    for groups_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        try:
            groups = ds.get(groups_keyword)
            if groups and index < len(groups):
                items = groups[index].get(sequence)
                if items:
                    return items[0]
        except Exception:  # noqa: S112 - a malformed group is as good as none
            continue
    return None


def _float(value: Any) -> float | None:
    from pydicom.multival import MultiValue

    try:
        if isinstance(value, list | tuple | MultiValue):
            value = value[0] if len(value) else None
        if value is None or value == "":
            return None
        result = float(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return result if math.isfinite(result) else None


def rescale(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) for this frame, or None when the file has none."""
    item = _functional_item(ds, frame, "PixelValueTransformationSequence")
    for source in (item, ds):
        if source is None:
            continue
        slope = _float(source.get("RescaleSlope"))
        intercept = _float(source.get("RescaleIntercept"))
        if slope is not None or intercept is not None:
            return (slope if slope not in (None, 0.0) else 1.0), intercept or 0.0
    return None


def _modality_values(ds: Dataset, arr: np.ndarray, frame: int) -> np.ndarray:
    """Stored values to modality values, in the smallest of int16 / uint16 / int32 that holds
    them exactly, else float32."""
    import numpy as np
    from pydicom.pixels import apply_modality_lut

    if arr.dtype.kind == "f":
        values = arr.astype(np.float32)
        linear = rescale(ds, frame)
        if linear is not None:
            slope, intercept = linear
            values = values * np.float32(slope) + np.float32(intercept)
        return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        return _integer_fit(apply_modality_lut(arr, ds))
    linear = rescale(ds, frame)
    if linear is None or linear == (1.0, 0.0):
        return _integer_fit(arr)
    slope, intercept = linear
    if slope.is_integer() and intercept.is_integer():
        low, high = int(arr.min()), int(arr.max())
        ends = sorted((low * int(slope) + int(intercept), high * int(slope) + int(intercept)))
        if -(2**31) <= min(ends[0], low) and max(ends[1], high) < 2**31:
            # int32 holds the stored values, the result and every step between (monotonic).
            shifted = arr.astype(np.int32) * int(slope) + int(intercept)
            return _integer_fit(shifted)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _integer_fit(arr: np.ndarray) -> np.ndarray:
    import numpy as np

    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.size == 0:
        return arr.astype(np.uint16)
    low, high = int(arr.min()), int(arr.max())
    if low >= 0 and high <= 0xFFFF:
        return arr.astype(np.uint16)
    if -0x8000 <= low and high <= 0x7FFF:
        return arr.astype(np.int16)
    if -(2**31) <= low and high < 2**31:
        return arr.astype(np.int32)
    return arr.astype(np.float32)


def default_window(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """The file's first window (center, width) for this frame, if it has a usable one."""
    item = _functional_item(ds, frame, "FrameVOILUTSequence")
    for source in (item, ds):
        if source is None:
            continue
        center = _float(source.get("WindowCenter"))
        width = _float(source.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            return center, width
    # Only a VOI LUT table: its input range is the window it was made for.
    try:
        luts = ds.get("VOILUTSequence")
        if luts:
            descriptor = list(luts[0].LUTDescriptor)
            entries = descriptor[0] or 65536
            first = descriptor[1]
            return first + entries / 2, float(entries)
    except Exception:  # noqa: S110 - a broken VOI LUT: fall back to the data
        pass
    return None


def _data_window(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    import numpy as np

    flat = values.reshape(-1)
    step = max(flat.size // WINDOW_SAMPLE_PIXELS, 1)
    sample = flat[::step]
    lo, hi = (float(v) for v in np.percentile(sample, WINDOW_PERCENTILES))
    if hi <= lo:
        lo, hi = low, high
    if hi <= lo:
        return lo, 1.0
    return (lo + hi) / 2, hi - lo


def _gray_frame(ds: Dataset, arr: np.ndarray, frame: int, photometric: str) -> FrameData:
    import numpy as np

    if arr.ndim != 2:
        raise DecodeError(f"Unexpected decoded shape {arr.shape}")
    values = _modality_values(ds, arr, frame)
    rows, columns = values.shape
    low = float(values.min()) if values.size else 0.0
    high = float(values.max()) if values.size else 0.0
    window = default_window(ds, frame) or _data_window(values, low, high)
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    invert = photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")
    dtype = values.dtype.name
    return FrameData(
        rows=rows,
        columns=columns,
        kind="gray",
        dtype=dtype,
        data=np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes(),
        min_value=low,
        max_value=high,
        window_center=float(window[0]),
        window_width=float(window[1]),
        invert=invert,
    )


# --- colour -------------------------------------------------------------------------------------


def _rgb_frame(ds: Dataset, arr: np.ndarray, *, palette: bool = False) -> FrameData:
    import numpy as np

    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DecodeError(f"Unexpected decoded colour shape {arr.shape}")
    rgb = arr[:, :, :3]
    if rgb.dtype != np.uint8:
        if palette:
            # Palette entries are 8 or 16 bits; some writers declare 16 and store 8-bit values.
            bits = 16 if int(rgb.max(initial=0)) > 0xFF else 8
        else:
            bits = _image_int(ds, "BitsStored", rgb.dtype.itemsize * 8)
            bits = min(max(bits, 8), rgb.dtype.itemsize * 8)
        if rgb.dtype.kind == "i":
            rgb = np.clip(rgb, 0, None)
        rgb = (rgb.astype(np.uint64) >> (bits - 8)).clip(0, 255).astype(np.uint8)
    rows, columns = rgb.shape[:2]
    low = float(rgb.min()) if rgb.size else 0.0
    high = float(rgb.max()) if rgb.size else 0.0
    return FrameData(
        rows=rows,
        columns=columns,
        kind="rgb",
        dtype="uint8",
        data=np.ascontiguousarray(rgb).tobytes(),
        min_value=low,
        max_value=high,
        window_center=127.5,
        window_width=256.0,
        invert=False,
    )


# --- what the viewer shows next to the pixels ---------------------------------------------------


def _floats(value: Any, count: int) -> list[float] | None:
    from pydicom.multival import MultiValue

    try:
        items = list(value) if isinstance(value, list | tuple | MultiValue) else []
        result = [float(v) for v in items[:count]]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(result) != count or not all(math.isfinite(v) for v in result):
        return None
    return result


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).replace("\x00", "").strip()[:200]


def frame_meta(ds: Dataset, frame: int) -> dict[str, Any]:
    """What the viewer labels and measures a frame with; every value JSON-serialisable."""
    measures = _functional_item(ds, frame, "PixelMeasuresSequence")
    spacing: list[float] | None = None
    spacing_kind: str | None = None
    for source in (measures, ds):
        if source is None:
            continue
        spacing = _floats(source.get("PixelSpacing"), 2)
        if spacing and all(v > 0 for v in spacing):
            spacing_kind = "PixelSpacing"
            break
        spacing = None
    if spacing is None:
        imager = _floats(ds.get("ImagerPixelSpacing"), 2)
        if imager and all(v > 0 for v in imager):
            spacing, spacing_kind = imager, "ImagerPixelSpacing"

    thickness = _float(measures.get("SliceThickness")) if measures is not None else None
    if thickness is None:
        thickness = _float(ds.get("SliceThickness"))
    position_item = _functional_item(ds, frame, "PlanePositionSequence")
    position = _floats(
        (position_item or ds).get("ImagePositionPatient")
        if position_item is not None
        else ds.get("ImagePositionPatient"),
        3,
    )
    orientation_item = _functional_item(ds, frame, "PlaneOrientationSequence")
    orientation = _floats(
        (orientation_item if orientation_item is not None else ds).get("ImageOrientationPatient"),
        6,
    )
    try:
        instance_number: int | None = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        instance_number = None
    modality = _text(ds, "Modality").upper()
    has_rescale = rescale(ds, frame) is not None
    return {
        "pixel_spacing": spacing,
        "spacing_kind": spacing_kind,
        "slice_location": _float(ds.get("SliceLocation")),
        "slice_thickness": thickness,
        "instance_number": instance_number,
        "number_of_frames": number_of_frames(ds),
        "modality": modality,
        "series_description": _text(ds, "SeriesDescription"),
        "image_position": position,
        "image_orientation": orientation,
        "units": "HU" if modality == "CT" and has_rescale else "",
        "photometric": _text(ds, "PhotometricInterpretation").upper(),
    }
