"""WADO-RS (PS3.18 §10.4): instances, metadata, bulk data and frames, from the stored copies.

Every stored object is read through `transfers.integrity.instance_open`, so its SHA-256 and
size are checked as it goes: an instance sent as stored is handed on one chunk behind its
reader (the last chunk of a damaged object is never sent, the multipart body stays unfinished
and the client sees a broken answer, never a damaged image); anything decoded (metadata,
frames, conversions) is checked before a byte of it is sent.

Transfer syntaxes (§8.7.3.5): `transfer-syntax=*` is the instance as stored, byte for byte, each
part naming its own syntax. Without a transfer-syntax, or with Explicit VR Little Endian, an
instance stored otherwise is converted: decompressed (pydicom and its pylibjpeg plugins) or
re-encoded from implicit VR, deflate or big endian (the push's conversion,
`transfers.dicom.convert`: binary values swapped word by word, 1-bit data kept packed). A syntax
Relay cannot produce (a compression with no decoder installed, or a compressed syntax asked
for an image stored otherwise: Relay never compresses) makes the whole request 406 before
anything is sent, with the reason and the advice to ask for `transfer-syntax=*`: a study
answered with some images missing would look complete to the client.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from .. import integrity
from ..dicom.convert import dataset_convert
from ..dicomio import dataset_open
from ..models import Instance
from .accept import MediaRange

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset

# numpy and pydicom are imported inside the functions that read files: the DICOMweb views import
# this module, and a web worker serving pages loads no pixel code
# (tests/relay/test_lean_imports.py).

EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Stored this way, the pixel data is already uncompressed little endian: frames are slices
# (explicit, implicit and deflated explicit VR little endian).
LITTLE_ENDIAN = {EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"}
CHUNK = 1024 * 1024
# Top-level binary values larger than this go out as a BulkDataURI in metadata.
BULK_THRESHOLD = 1024
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
PIXEL_DATA_TAG = "7FE00010"
MAX_FRAMES = 1000  # frame numbers in one request


class NotAcceptable(Exception):
    """Nothing the Accept header allows can be produced (406, with this text)."""


class FrameMissing(Exception):
    """A frame number past the instance's frames (404)."""


# --- what to produce ---------------------------------------------------------------------------


def _convertible(stored: str) -> bool:
    """Whether an instance stored in this syntax can be turned into explicit VR little endian."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if stored in LITTLE_ENDIAN:
        return True
    syntax = UID(stored)
    if not syntax.is_compressed:
        return True  # big endian: re-encoded by the push's conversion
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def dicom_range(media: MediaRange) -> bool:
    if media.type == "*/*" or media.type == "multipart/*":
        return True
    return media.type == "multipart/related" and media.inner_type in ("application/dicom", "")


def instances_syntax(ranges: list[MediaRange], stored: set[str]) -> str:
    """The transfer syntax the instances go out in ("*": each as stored), from the best range
    that can be met for all of them; NotAcceptable otherwise."""
    asked = False
    for media in ranges:
        if not dicom_range(media):
            continue
        asked = True
        wanted = media.transfer_syntax or EXPLICIT_LE
        if wanted == "*":
            return "*"
        if all(
            syntax == wanted or (wanted == EXPLICIT_LE and _convertible(syntax))
            for syntax in stored
        ):
            return wanted
    if not asked:
        raise NotAcceptable('Instances are sent as multipart/related; type="application/dicom".')
    cannot = sorted(syntax for syntax in stored if not _convertible(syntax))
    raise NotAcceptable(
        "Some images cannot be converted to the transfer syntax asked for (they are stored as "
        f"{', '.join(cannot) or 'another syntax'}); ask for transfer-syntax=* to have them as stored."
    )


def octet_range(media: MediaRange) -> bool:
    if media.type in ("*/*", "multipart/*", "application/octet-stream"):
        return True
    return media.type == "multipart/related" and media.inner_type in (
        "application/octet-stream",
        "*/*",
        "",
    )


def pixels_syntax(ranges: list[MediaRange], stored: str) -> str:
    """The syntax frames (or pixel bulk data) go out in: the stored one for compressed pixels
    as stored, else explicit VR little endian (raw values); NotAcceptable otherwise."""
    from pydicom.uid import UID

    compressed = UID(stored).is_compressed
    for media in ranges:
        if not octet_range(media):
            continue
        wanted = media.transfer_syntax or EXPLICIT_LE
        if wanted == "*":
            return stored if compressed else EXPLICIT_LE
        if wanted == EXPLICIT_LE and (not compressed or _convertible(stored)):
            return EXPLICIT_LE
        if wanted == stored and compressed:
            return stored
    raise NotAcceptable(
        'Frames and bulk data are sent as multipart/related; type="application/octet-stream", '
        f"uncompressed ({EXPLICIT_LE}) or as stored (transfer-syntax=*)."
    )


# --- multipart ---------------------------------------------------------------------------------


def boundary_new() -> str:
    return uuid.uuid4().hex


def multipart_content_type(part_type: str, boundary: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def _part_head(boundary: str, content_type: str, length: int | None = None) -> bytes:
    head = f"--{boundary}\r\nContent-Type: {content_type}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + "\r\n").encode("ascii")


def _closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def parts_stream(parts: Iterator[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    """(content type, body) pairs as a multipart body."""
    for content_type, body in parts:
        yield _part_head(boundary, content_type, len(body))
        yield body
        yield b"\r\n"
    yield _closing(boundary)


# --- instances ---------------------------------------------------------------------------------


def _stored_chunks(instance: Instance) -> Iterator[bytes]:
    """The stored object's bytes, each chunk handed on once the next was read, so that the read
    that checks the digest (at the end) comes before the last bytes go."""
    with integrity.instance_open(instance) as reader:
        held = b""
        while chunk := reader.read(CHUNK):
            if held:
                yield held
            held = chunk
        if held:
            yield held


@contextmanager
def dataset_verified(instance: Instance, *, stop_before_pixels: bool = False) -> Iterator[Dataset]:
    """The stored instance as a dataset, read through the bounded reader and checked whole
    against its SHA-256 before the caller sees it."""
    with (
        integrity.instance_open(instance, at_end=False) as reader,
        dataset_open(cast(IO[bytes], reader), stop_before_pixels=stop_before_pixels) as (ds, _),
    ):
        reader.verify()
        yield ds


def _converted(instance: Instance) -> bytes:
    """The instance re-encoded in explicit VR little endian (decompressed when compressed),
    with its own SOP Instance UID: the same image."""
    with dataset_verified(instance) as ds:
        dataset_convert(ds, syntax=EXPLICIT_LE)
        buffer = io.BytesIO()
        ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def instances_stream(instances: list[Instance], syntax: str, boundary: str) -> Iterator[bytes]:
    """The instances as multipart/related application/dicom parts, one at a time (memory holds
    one chunk of a stored instance, or one converted instance)."""
    for instance in instances:
        stored = instance.transfer_syntax_uid
        if syntax == "*" or syntax == stored:
            yield _part_head(
                boundary, f"application/dicom; transfer-syntax={stored}", instance.size_bytes
            )
            yield from _stored_chunks(instance)
        else:
            body = _converted(instance)
            yield _part_head(boundary, f"application/dicom; transfer-syntax={syntax}", len(body))
            yield body
        yield b"\r\n"
    yield _closing(boundary)


# --- metadata ----------------------------------------------------------------------------------


def instance_metadata(instance: Instance, instance_url: str) -> dict[str, Any]:
    """The instance's attributes as DICOM JSON (PS3.18 F.2): top-level binary values over 1 KiB,
    and the pixel data, as BulkDataURIs under `instance_url`/bulk/; strings in UTF-8."""
    from pydicom.uid import UID

    with dataset_verified(instance, stop_before_pixels=True) as ds:
        bulk: dict[str, str] = {}
        for element in list(ds):
            if (
                element.VR in BULK_VRS
                and element.value is not None
                and len(element.value) > BULK_THRESHOLD
            ):
                tag = f"{element.tag:08X}"
                bulk[tag] = element.VR
                del ds[element.tag]
        out = ds.to_json_dict(bulk_data_threshold=1 << 30, suppress_invalid_tags=True)
    if instance.rows is not None:
        bulk[PIXEL_DATA_TAG] = "OB" if UID(instance.transfer_syntax_uid).is_compressed else "OW"
    for tag, vr in bulk.items():
        out[tag] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulk/{tag}"}
    out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    out["00083002"] = {"vr": "UI", "Value": [instance.transfer_syntax_uid]}
    return dict(sorted(out.items()))


def metadata_stream(instances: list[Instance], url_of: Any) -> Iterator[bytes]:
    """A JSON array of the instances' metadata, one instance read at a time."""
    yield b"["
    for number, instance in enumerate(instances):
        if number:
            yield b","
        yield json.dumps(instance_metadata(instance, url_of(instance)), ensure_ascii=False).encode()
    yield b"]"


# --- frames and bulk data ----------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """What a frames or bulk data answer sends: bodies in the syntax named by `syntax`."""

    syntax: str
    bodies: list[bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(body) for body in self.bodies)

    def stream(self, boundary: str) -> Iterator[bytes]:
        content_type = f"application/octet-stream; transfer-syntax={self.syntax}"
        return parts_stream(((content_type, body) for body in self.bodies), boundary)


def frame_numbers(text: str) -> list[int]:
    """`1,3,5` as numbers (1-based); ValueError for anything else."""
    items = [item.strip() for item in text.split(",")]
    if (
        not items
        or len(items) > MAX_FRAMES
        or not all(item.isdigit() and len(item) <= 9 for item in items)
    ):
        raise ValueError(f"a frame list is 1 to {MAX_FRAMES} numbers between commas")
    numbers = [int(item) for item in items]
    if min(numbers) < 1:
        raise ValueError("frames are numbered from 1")
    return numbers


def _raw(array: np.ndarray, bits_allocated: int) -> bytes:
    import numpy as np

    if bits_allocated == 1:
        return np.packbits(array.astype(np.uint8), bitorder="little").tobytes()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def frames_get(instance: Instance, numbers: list[int], syntax: str) -> Parts:
    """The frames `numbers` of the instance in `syntax`: compressed frames as stored, or raw
    little-endian values (decoded when stored compressed or big endian)."""
    from pydicom.encaps import get_frame
    from pydicom.pixels import pixel_array

    with dataset_verified(instance) as ds:
        if "PixelData" not in ds:
            raise FrameMissing("This instance has no pixel data.")
        count = int(ds.get("NumberOfFrames") or 1)
        if max(numbers) > count:
            raise FrameMissing(f"This instance has {count} frame(s).")
        stored = str(ds.file_meta.TransferSyntaxUID)
        if syntax != EXPLICIT_LE:  # compressed, as stored
            offsets = None
            if "ExtendedOffsetTable" in ds:
                offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            bodies = [
                get_frame(ds.PixelData, n - 1, number_of_frames=count, extended_offsets=offsets)
                for n in numbers
            ]
            return Parts(stored, bodies)
        bits = int(ds.get("BitsAllocated") or 8)
        if stored in LITTLE_ENDIAN and bits % 8 == 0:
            size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * bits // 8
            return Parts(EXPLICIT_LE, [ds.PixelData[(n - 1) * size : n * size] for n in numbers])
        bodies = [_raw(pixel_array(ds, index=n - 1), bits) for n in numbers]
        return Parts(EXPLICIT_LE, bodies)


def bulk_get(instance: Instance, tag: str, syntax: str | None) -> Parts:
    """The value behind a BulkDataURI: the pixel data (all frames, `syntax` as for frames) or
    another top-level binary value as it is. FrameMissing when there is no such value."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import UID

    if tag == PIXEL_DATA_TAG:
        count = max(instance.number_of_frames or 1, 1)
        assert syntax is not None
        if syntax != EXPLICIT_LE:
            return frames_get(instance, list(range(1, count + 1)), syntax)
        with dataset_verified(instance) as ds:
            if "PixelData" not in ds:
                raise FrameMissing("This instance has no pixel data.")
            stored = str(ds.file_meta.TransferSyntaxUID)
            bits = int(ds.get("BitsAllocated") or 8)
            if stored in LITTLE_ENDIAN:
                return Parts(EXPLICIT_LE, [bytes(ds.PixelData)])
            return Parts(EXPLICIT_LE, [_raw(pixel_array(ds), bits)])
    with dataset_verified(instance) as ds:
        element = ds.get(int(tag, 16))
        if element is None or element.VR not in BULK_VRS or element.value is None:
            raise FrameMissing("This instance has no such bulk data.")
        stored = UID(ds.file_meta.TransferSyntaxUID)
        # Values keep the byte order they were stored in (big endian is said so).
        return Parts(
            EXPLICIT_LE if stored.is_little_endian else str(stored), [bytes(element.value)]
        )
