"""Converting an instance for a destination that takes only uncompressed little endian.

A PACS may refuse an instance's own transfer syntax and accept only explicit or implicit VR
little endian. A compressed instance is decompressed (pydicom's `decompress`, same SOP Instance
UID). A big-endian one is re-encoded element by element: pydicom re-encodes every number it
decodes (US, SS, UL, FL, AT ...) in the byte order it writes, but leaves the bytes of the
binary VRs (OW, OL, OF, OD, OV) as they were read ("does not do the byte swapping", says its
`write_OWvalue`), so those are swapped here, word by word: lookup tables (segmented or not),
overlays, float pixel data and the pixel data itself.

The pixel data follows pydicom's decoder, the reference the tests compare with, rather than
going through `pixel_array`: that would unpack 1-bit images eight to a byte (98,304 bytes become
786,432), interleave planar colour and mask unused high bits. Swapping the words keeps the
bit-packing, the PlanarConfiguration and every bit of every pixel, and needs a passing copy
of the pixel data, not a decoded array.

Private elements whose VR is unknown (UN) are kept as they are: their byte order cannot be
known without the VR.

The converted copy is written to a temporary file in exactly the syntax the destination
accepted, so that pynetdicom streams it as it does a stored file, without encoding the data set
again in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# pydicom is imported where a data set is converted: the push module imports this one, and the
# PACS pages' views import the push module (tests/relay/test_lean_imports.py).

# Explicit and implicit VR little endian (PS3.5 A.2, A.1).
LITTLE_ENDIAN = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
# Width of the words whose bytes are swapped, by VR (PS3.5 6.2: other word, long, float,
# double and very long).
WORD_BYTES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
PIXEL_DATA = 0x7FE00010


class ConversionError(ValueError):
    """The instance cannot be converted faithfully; nothing of it is sent."""


def dataset_convert(ds: Dataset, *, syntax: str) -> None:
    """Make `ds` (a Part 10 dataset) encodable in `syntax`, explicit or implicit VR little
    endian, in place, keeping its SOP Instance UID: it is the same image, not a new one."""
    from pydicom.uid import UID

    if syntax not in LITTLE_ENDIAN:
        raise ValueError(f"Not an uncompressed little endian transfer syntax: {syntax}")
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if stored.is_compressed:
        ds.decompress(generate_instance_uid=False)
    elif not stored.is_little_endian:
        _swap(ds)
    ds.file_meta.TransferSyntaxUID = UID(syntax)


@contextmanager
def converted_copy(ds: Dataset, *, syntax: str) -> Iterator[Path]:
    """`ds` converted to `syntax` and written as a Part 10 file, for the length of a block."""
    from pydicom.filewriter import dcmwrite

    dataset_convert(ds, syntax=syntax)
    with tempfile.NamedTemporaryFile(suffix=".dcm") as copy:
        # The encoding follows the file meta's transfer syntax; pydicom writes every element
        # decoded from the big-endian original anew in it.
        dcmwrite(copy, ds, enforce_file_format=True)
        copy.flush()
        del ds  # the caller has let go of it too: memory is not held during the send
        yield Path(copy.name)


def _swap(ds: Dataset) -> None:
    """Big to little endian, this dataset and every sequence item in it."""
    for elem in ds:  # iterating decodes each raw element as big endian
        if elem.VR == "SQ":
            for item in elem.value:
                _swap(item)
            continue
        if elem.value is None or not isinstance(elem.value, bytes | bytearray):
            continue
        width = (
            _pixel_word_bytes(ds, elem.VR) if elem.tag == PIXEL_DATA else WORD_BYTES.get(elem.VR, 1)
        )
        if width > 1:
            elem.value = _swapped(elem.value, width, where=str(elem.tag))
    # What is left reads as little endian now; pydicom and pynetdicom check this.
    ds.set_original_encoding(False, True)


def _pixel_word_bytes(ds: Dataset, vr: str) -> int:
    """How pydicom's decoder reads big-endian pixel data: 1-bit data as a stream of bytes,
    8-bit data stored as OW in swapped pairs, wider samples as big-endian words."""
    bits = int(ds.get("BitsAllocated") or 0)
    if bits == 1:
        return 1
    if bits == 8:
        return 2 if vr == "OW" else 1
    if bits in (16, 32, 64):
        return bits // 8
    raise ConversionError(f"Cannot convert pixel data with {bits} bits allocated")


def _swapped(value: bytes | bytearray, width: int, *, where: str) -> bytes:
    import numpy as np  # pixel code: loaded where pixels are touched

    if len(value) % width:
        raise ConversionError(f"{where}: {len(value)} bytes is not a whole number of words")
    # bytes, not a bytearray: pydicom would take a bytearray for a list of numbers.
    return np.frombuffer(value, dtype=f"u{width}").byteswap().tobytes()
