"""A synthetic but realistic CT series for the ingest benchmark, written once and cached.

Each slice is a 512 x 512, 16-bit signed, MONOCHROME2 CT image in Explicit VR Little Endian with
RescaleSlope 1 / RescaleIntercept -1024, the header attributes a real scanner writes, and pixel
content that looks like an axial slice through a torso: a circular reconstruction field of view
(padding outside it), a couch, a fat ring around soft tissue, lungs in the upper slices, a liver in
the lower ones, a spine and an aorta, all with Gaussian noise.

numpy is not installed in Relay's virtualenv (and must not be added for a benchmark), so the image
is built with the standard library only. A per-pixel Python loop would take minutes for 78 million
pixels, so each row is assembled from a few constant-tissue runs, and each run is a slice of a
pre-computed noise buffer for that tissue: the per-slice work is a few thousand byte slices.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from array import array
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

SIZE = 512
# Stored value = HU + 1024 (RescaleIntercept -1024), the convention of most CT scanners.
INTERCEPT = -1024
# Outside the reconstruction circle scanners write a padding value far below air.
PADDING_STORED = -2000
# Bump when the generated content changes, so that an old cache is not reused.
GENERATOR_VERSION = 2
MANIFEST = "manifest.json"

# tissue name -> (mean HU, noise sigma in HU)
TISSUES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 6.0),
    "couch": (250.0, 25.0),
    "fat": (-100.0, 15.0),
    "soft": (40.0, 14.0),
    "lung": (-850.0, 30.0),
    "liver": (60.0, 12.0),
    "blood": (45.0, 12.0),
    "bone": (700.0, 60.0),
}
NOISE_VALUES = 1 << 16  # per-tissue noise buffer, in pixels


@dataclass(frozen=True)
class Series:
    """A cached series on disk: its files in slice order and their total size."""

    folder: Path
    files: list[Path]

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def _noise_buffers(rng: random.Random) -> dict[str, bytes]:
    """Little-endian int16 bytes of stored values (HU + 1024 + noise) for every tissue."""
    buffers: dict[str, bytes] = {}
    for name, (mean, sigma) in TISSUES.items():
        values = array(
            "h",
            (
                max(-32768, min(32767, round(mean - INTERCEPT + rng.gauss(0.0, sigma))))
                for _ in range(NOISE_VALUES)
            ),
        )
        if sys.byteorder == "big":
            values.byteswap()  # DICOM Explicit VR Little Endian
        buffers[name] = values.tobytes()
    padding = array("h", [PADDING_STORED] * SIZE)
    if sys.byteorder == "big":
        padding.byteswap()
    buffers["padding"] = padding.tobytes()
    return buffers


Segment = tuple[int, int, str]  # [start, end) columns and the tissue that fills them


def _paint(segments: list[Segment], start: int, end: int, tissue: str) -> list[Segment]:
    """Overlay [start, end) with `tissue` on a row described as sorted, contiguous segments."""
    start, end = max(start, 0), min(end, SIZE)
    if start >= end:
        return segments
    out: list[Segment] = []
    for s, e, t in segments:
        if e <= start or s >= end:
            out.append((s, e, t))
            continue
        if s < start:
            out.append((s, start, t))
        if e > end:
            out.append((end, e, t))
    out.append((start, end, tissue))
    out.sort()
    return out


def _ellipse_span(y: int, cx: float, cy: float, rx: float, ry: float) -> tuple[int, int] | None:
    dy = (y + 0.5 - cy) / ry
    if abs(dy) >= 1.0:
        return None
    half = rx * math.sqrt(1.0 - dy * dy)
    return math.ceil(cx - half), math.floor(cx + half) + 1


def _slice_pixels(z: float, rng: random.Random, noise: dict[str, bytes]) -> bytes:
    """The pixel data of one axial slice; z runs from 0 (top of the series) to 1 (bottom)."""
    c = SIZE / 2
    # The body is widest in the middle of the series, like a chest-abdomen scan.
    body_rx = 185 + 20 * math.sin(math.pi * z)
    body_ry = 125 + 12 * math.sin(math.pi * z)
    body_cy = c - 10
    lungs = z < 0.55
    lung_scale = math.sin(math.pi * min(z / 0.55, 1.0)) if lungs else 0.0
    liver = z > 0.45
    shapes: list[tuple[float, float, float, float, str]] = [
        (c, body_cy, body_rx, body_ry, "fat"),
        (c, body_cy, body_rx - 14, body_ry - 12, "soft"),
    ]
    if lungs and lung_scale > 0.05:
        shapes += [
            (c - 80, body_cy - 10, 65 * lung_scale + 5, 85 * lung_scale + 5, "lung"),
            (c + 80, body_cy - 10, 60 * lung_scale + 5, 80 * lung_scale + 5, "lung"),
        ]
    if liver:
        shapes.append((c - 60, body_cy + 5, 90 * min((z - 0.45) * 4, 1.0) + 5, 70, "liver"))
    shapes += [
        (c + 10, body_cy + 45, 14, 14, "blood"),  # aorta
        (c, body_cy + 85, 24, 22, "bone"),  # vertebral body
    ]
    rows: list[bytes] = []
    fov = SIZE / 2
    for y in range(SIZE):
        fov_span = _ellipse_span(y, c, c, fov, fov)
        segments: list[Segment] = [(0, SIZE, "padding")]
        if fov_span is not None:
            segments = _paint(segments, fov_span[0], fov_span[1], "air")
            if 440 <= y < 452:  # the couch, clipped by the field of view
                segments = _paint(segments, max(fov_span[0], 60), min(fov_span[1], 452), "couch")
            for cx, cy, rx, ry, tissue in shapes:
                span = _ellipse_span(y, cx, cy, rx, ry)
                if span is not None:
                    segments = _paint(segments, span[0], span[1], tissue)
        parts: list[bytes] = []
        for s, e, tissue in segments:
            n = (e - s) * 2
            buf = noise[tissue]
            if tissue == "padding":
                parts.append(buf[:n])
            else:
                offset = rng.randrange(0, len(buf) - n) & ~1  # stay on a pixel boundary
                parts.append(buf[offset : offset + n])
        rows.append(b"".join(parts))
    pixels = b"".join(rows)
    assert len(pixels) == SIZE * SIZE * 2
    return pixels


def _dataset(
    *, index: int, study_uid: str, series_uid: str, frame_uid: str, pixels: bytes
) -> Dataset:
    """One CT Image Storage instance with the attributes a scanner writes."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RELAY_BENCH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    study_date = date(2024, 3, 14).strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AcquisitionTime = ds.ContentTime = f"1016{index % 60:02d}"
    ds.AccessionNumber = "BENCH000001"
    ds.Modality = "CT"
    ds.Manufacturer = "Relay Bench"
    ds.InstitutionName = "Relay Benchmark Hospital"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST ABDOMEN W/O CONTRAST"
    ds.SeriesDescription = "AXIAL 1.0 SOFT TISSUE"
    ds.ManufacturerModelName = "Synthetic 300"
    ds.PatientName = "Bench^Patient"
    ds.PatientID = "BENCH0001"
    ds.IssuerOfPatientID = "RELAYBENCH"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500.0"
    ds.ReconstructionDiameter = "500.0"
    ds.GantryDetectorTilt = "0.0"
    ds.TableHeight = "160.0"
    ds.XRayTubeCurrent = 200
    ds.ExposureTime = 500
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    z_mm = -float(index)  # 1 mm slices from the top down
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{z_mm:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z_mm:.1f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = SIZE
    ds.Columns = SIZE
    ds.PixelSpacing = ["0.9765625", "0.9765625"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelPaddingValue = PADDING_STORED
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    return ds


def ensure_series(cache_root: Path, count: int = 300, *, seed: int = 20240314) -> Series:
    """The cached series of `count` slices under `cache_root`, generated on first use."""
    folder = cache_root / f"ct-{count}x{SIZE}"
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        files = [folder / name for name in manifest.get("files", [])]
        if (
            manifest.get("version") == GENERATOR_VERSION
            and len(files) == count
            and all(path.exists() for path in files)
        ):
            return Series(folder, files)
    # Build in a scratch folder and rename at the end, so an interrupted run never leaves a
    # half-written series that a later run would take for a complete one.
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    scratch.mkdir(parents=True)
    rng = random.Random(seed)
    noise = _noise_buffers(rng)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    names: list[str] = []
    for index in range(count):
        pixels = _slice_pixels(index / max(count - 1, 1), rng, noise)
        ds = _dataset(
            index=index,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            pixels=pixels,
        )
        name = f"CT{index + 1:06d}.dcm"
        ds.save_as(scratch / name, enforce_file_format=True)
        names.append(name)
    manifest = {
        "version": GENERATOR_VERSION,
        "count": count,
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "files": names,
    }
    (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))
    scratch.rename(folder)
    return Series(folder, [folder / name for name in names])
