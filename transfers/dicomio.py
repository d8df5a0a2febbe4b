"""Reading DICOM files from outside with bounded memory, and checking their structure.

Two things every reader of a stored or incoming file needs, kept in one place so that ingest,
the viewer and anything else that opens a file use the same bounds:

- `dataset_open`: the dataset of a Part 10 file. pydicom inflates a Deflated Explicit VR Little
  Endian data set whole, in memory (a 1 MB file can inflate to gigabytes); here it is inflated as
  a stream, in chunks, into a spooled temporary file, and refused once it passes an absolute cap
  or a multiple of its compressed size (`InflateTooLarge`). The inflated copy is what pydicom
  then reads, large values left in it (deferred), so memory stays flat in the file's size.
- `structure_check`: the data set walked element by element from its first byte to its last
  without reading the values, so that a file cut inside any element (the trailing padding after
  the pixel data included), or damaged so that its lengths no longer add up, is refused with
  the place and the fault, rather than read on past the damage.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:
    # pydicom is imported where a file is read (`dataset_read`), not with this module: its own
    # import loads numpy, Pillow and the JPEG decoders, which a web worker serving pages never
    # needs (tests/relay/test_lean_imports.py), and this module is imported by the push, the
    # exports and the viewer's services, which the pages' views import.
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.tag import BaseTag

# Deflated Explicit VR Little Endian (PS3.5 A.5), pydicom's DeflatedExplicitVRLittleEndian.
DEFLATED = "1.2.840.10008.1.2.1.99"
# Defaults when Django's settings do not say (RELAY_MAX_INFLATED_BYTES, RELAY_MAX_INFLATE_RATIO).
MAX_INFLATED_BYTES = 1024 * 1024 * 1024
MAX_INFLATE_RATIO = 200
# A small deflated file may always inflate this far, however well it compressed (a blank
# image deflates a thousandfold).
INFLATE_FLOOR_BYTES = 64 * 1024 * 1024
# The inflated copy stays in memory up to this size, then moves to a temporary file.
INFLATE_MEMORY_BYTES = 8 * 1024 * 1024
IN_CHUNK = 64 * 1024
OUT_CHUNK = 1024 * 1024

UNDEFINED = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
ITEM_END = (0xFFFE, 0xE00D)
SEQUENCE_END = (0xFFFE, 0xE0DD)
PIXEL_DATA = (0x7FE0, 0x0010)
# Every VR of PS3.5 Table 6.2-1 (pydicom's `valuerep.VR`, written out so that this module loads
# without pydicom; tests/relay/test_lean_imports.py holds the two equal).
KNOWN_VRS = {
    vr.encode("ascii")
    for vr in (
        "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
        "UR US UT UV"
    ).split()
}
# VRs with a 4-byte length in explicit VR (PS3.5 7.1.2).
LONG_VRS = {vr.encode("ascii") for vr in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()}


class Malformed(Exception):
    """The file's structure is broken; `reason` says where and how, for the sender."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InflateTooLarge(Malformed):
    """A deflated data set inflates past the bounds: refused as a likely decompression bomb."""


@dataclass(frozen=True)
class InflateLimits:
    max_bytes: int = MAX_INFLATED_BYTES
    ratio: int = MAX_INFLATE_RATIO
    temp_dir: str | None = None

    def limit_for(self, compressed: int) -> int:
        return min(self.max_bytes, max(self.ratio * compressed, INFLATE_FLOOR_BYTES))


def inflate_limits() -> InflateLimits:
    """The bounds from Django's settings when they are configured, else the defaults."""
    try:
        from django.conf import settings

        return InflateLimits(
            max_bytes=int(getattr(settings, "RELAY_MAX_INFLATED_BYTES", MAX_INFLATED_BYTES)),
            ratio=int(getattr(settings, "RELAY_MAX_INFLATE_RATIO", MAX_INFLATE_RATIO)),
            temp_dir=getattr(settings, "FILE_UPLOAD_TEMP_DIR", None) or None,
        )
    except Exception:  # no Django settings (a script, a worker without them): the defaults
        return InflateLimits()


def _size(num: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if num < 1024:
            return f"{num:.0f} {unit}" if unit == "bytes" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} GiB"


def inflate_bounded(src: IO[bytes], *, compressed: int, limits: InflateLimits) -> IO[bytes]:
    """Inflate the raw deflate stream read from `src` into a spooled temporary file, at most
    `limits.limit_for(compressed)` bytes of it; the file is returned at position 0."""
    limit = limits.limit_for(compressed)
    out = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - the caller closes it
        max_size=INFLATE_MEMORY_BYTES, dir=limits.temp_dir
    )
    try:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        crc = 0
        while not inflater.eof:
            data = src.read(IN_CHUNK)
            if not data:
                break
            while data:
                # max_length keeps each step's output to one chunk, whatever the ratio.
                piece = inflater.decompress(data, OUT_CHUNK)
                total += len(piece)
                if total > limit:
                    raise InflateTooLarge(
                        f"The deflated data set inflates to more than {_size(limit)} "
                        f"(from {_size(compressed)}; the limits are {limits.ratio} times the "
                        f"compressed size and {_size(limits.max_bytes)}): refused as a likely "
                        "decompression bomb."
                    )
                out.write(piece)
                crc = zlib.crc32(piece, crc)
                data = inflater.unconsumed_tail
                if inflater.eof:
                    break
        tail = inflater.flush()
        total += len(tail)
        if total > limit:
            raise InflateTooLarge(
                f"The deflated data set inflates to more than {_size(limit)}: refused as a "
                "likely decompression bomb."
            )
        out.write(tail)
        crc = zlib.crc32(tail, crc)
        if not inflater.eof:
            raise Malformed(
                "The file meta says the data set is deflated, but the deflated stream ends "
                "early: the file is truncated."
            )
        extra = inflater.unused_data + src.read(IN_CHUNK)
        # One byte may pad the stream to an even length (PS3.5 A.5); some writers add the
        # gzip trailer (CRC-32 and size of the inflated data), which is checked if present.
        if len(extra) in (8, 9) and extra[:8] == struct.pack("<II", crc, total & 0xFFFFFFFF):
            extra = extra[8:]
        if len(extra) > 1:
            raise Malformed(
                "The file has data after the end of its deflated data set "
                f"(at least {len(extra)} bytes)."
            )
    except zlib.error as exc:
        out.close()
        raise Malformed(
            f"The file meta says the data set is deflated, but it does not inflate ({exc})."
        ) from None
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


# --- reading --------------------------------------------------------------------------------------


def _meta_group(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 2


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)


def dataset_read(
    fp: IO[bytes],
    *,
    size: int | None = None,
    stop_before_pixels: bool = False,
    defer_size: int | None = None,
    force: bool = False,
    limits: InflateLimits | None = None,
    check_depth: int | None = None,
) -> tuple[FileDataset, IO[bytes]]:
    """(the dataset, the file its offsets refer to): `fp` itself, or for a deflated file the
    bounded inflated copy of its data set, which is also the dataset's `buffer` and which the
    caller closes (`dataset_open` does).

    Large values left in the file (`defer_size`) are read from the second of the pair. With
    `check_depth`, the file meta and the whole data set are walked first (`structure_check`,
    sequences at most that deep), so that a damaged file is refused for its real fault before
    pydicom reads on past it.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import UID, ExplicitVRBigEndian, PrivateTransferSyntaxes

    if size is None and (check_depth is not None or _deflated_maybe(fp)):
        size = fp.seek(0, 2)
    fp.seek(0)
    end_of_file = size if size is not None else 0  # known whenever it is used below
    # The file meta is read first, by itself: pydicom's dcmread would inflate a deflated data
    # set whole before anything could look at its size.
    binary = cast(BinaryIO, fp)
    preamble = read_preamble(binary, force)
    meta_start = fp.tell()
    if check_depth is not None:
        # The meta walked before pydicom reads it: damage there is named, not tripped over.
        structure_check(
            fp,
            start=meta_start,
            end=end_of_file,
            implicit=False,
            little=True,
            max_depth=0,
            only_group=2,
        )
        fp.seek(meta_start)
    meta = FileMetaDataset(read_dataset(binary, False, True, stop_when=_meta_group))
    start = fp.tell()
    ts = str(meta.get("TransferSyntaxUID") or "").strip("\x00 ")
    if check_depth is not None:
        meta_check(meta, start=meta_start, end=start)
    if ts != DEFLATED:
        if check_depth is not None and ts:
            little = UID(ts) != ExplicitVRBigEndian
            if ts in PrivateTransferSyntaxes:
                private = PrivateTransferSyntaxes[PrivateTransferSyntaxes.index(ts)]
                little = private.is_little_endian
            structure_check(
                fp,
                start=start,
                end=end_of_file,
                implicit=False,
                little=little,
                max_depth=check_depth,
            )
        fp.seek(0)
        ds = pydicom.dcmread(
            fp, stop_before_pixels=stop_before_pixels, defer_size=defer_size, force=force
        )
        return ds, fp
    if size is None:
        size = fp.seek(0, 2)
    fp.seek(start)
    inflated = inflate_bounded(
        fp, compressed=max(size - start, 0), limits=limits or inflate_limits()
    )
    try:
        if check_depth is not None:
            end = inflated.seek(0, 2)
            structure_check(
                inflated,
                start=0,
                end=end,
                implicit=False,
                little=True,
                max_depth=check_depth,
                where=" of the inflated data set",
            )
        inflated.seek(0)
        dataset = read_dataset(
            cast(BinaryIO, inflated),
            False,
            True,
            stop_when=_at_pixels if stop_before_pixels else None,
            defer_size=defer_size,
        )
        result = FileDataset(inflated, dataset, preamble, meta, False, True)
        result.set_original_encoding(False, True, dataset._character_set)
    except BaseException:
        inflated.close()
        raise
    return result, inflated


@contextmanager
def dataset_open(fp: IO[bytes], **options: Any) -> Iterator[tuple[FileDataset, IO[bytes]]]:
    """`dataset_read` for the length of a block, the inflated copy (if any) closed after it."""
    ds, data_fp = dataset_read(fp, **options)
    try:
        yield ds, data_fp
    finally:
        if data_fp is not fp:
            data_fp.close()


def _deflated_maybe(fp: IO[bytes]) -> bool:
    """Whether the deflated transfer syntax's UID appears in the file's first kilobyte (the
    file meta): only then is the file's size needed, which some storages answer slowly."""
    fp.seek(0)
    return DEFLATED.encode("ascii") in fp.read(1024)


def meta_check(meta: FileMetaDataset, *, start: int, end: int) -> None:
    """The file meta's group length held to what is there."""
    declared = meta.get("FileMetaInformationGroupLength")
    actual = end - start - 12  # the group length element itself is 12 bytes
    if declared is not None and int(declared) != actual:
        raise Malformed(
            f"The file meta says it is {int(declared)} bytes long but it is {actual} "
            "(its group length does not match its elements): the file is damaged in its header."
        )


# --- structure ------------------------------------------------------------------------------------


@dataclass
class _Level:
    kind: str  # "dataset", "item" (a dataset up to its delimiter), "sequence", "fragments"
    start: int
    implicit: bool
    decided: bool  # whether the first element has settled implicit or explicit VR


def _tag(tag: tuple[int, int]) -> str:
    return f"({tag[0]:04X},{tag[1]:04X})"


def structure_check(
    fp: IO[bytes],
    *,
    start: int,
    end: int,
    implicit: bool,
    little: bool,
    max_depth: int,
    where: str = "",
    only_group: int | None = None,
) -> int:
    """Walk every element from `start` to `end` without reading values; raise `Malformed`
    naming the first fault. `where` follows every offset in a reason (" of the inflated data
    set"). With `only_group`, stop before the first top-level element of another group and
    return where it starts (the end of the file meta); else return `end`.

    Like pydicom, the first element of a data set decides between implicit and explicit VR
    whatever the transfer syntax says (some writers mix them up), and the items of a sequence
    of undefined length may be implicit VR inside an explicit data set.
    """
    endian = "<" if little else ">"
    head_struct = struct.Struct(endian + "HH")
    long_struct = struct.Struct(endian + "I")
    short_struct = struct.Struct(endian + "H")
    levels = [_Level("dataset", start, implicit, False)]
    pos = start
    fp.seek(start)

    def at(offset: int) -> str:
        return f"byte {offset}{where}"

    while True:
        level = levels[-1]
        if pos >= end:
            if pos > end:  # cannot happen: every skip is bounded below
                raise Malformed(f"The file ends inside an element at {at(end)}.")
            if level.kind == "dataset":
                return pos
            what = {"item": "an item", "sequence": "a sequence", "fragments": "the pixel data"}
            raise Malformed(
                f"The file ends inside {what[level.kind]} that began at {at(level.start)}: "
                "its end-of-sequence delimiter never comes (the file is truncated)."
            )
        header = fp.read(8)
        if len(header) < 8:
            raise Malformed(
                f"The file ends inside the header of an element at {at(pos)} "
                f"({len(header)} of its 8 bytes are there): the file is truncated."
            )
        tag = head_struct.unpack(header[:4])
        if only_group is not None and tag[0] != only_group and len(levels) == 1:
            return pos
        if tag[0] == 0xFFFE:
            (length,) = long_struct.unpack(header[4:])
            pos += 8
            pos = _delimiter(fp, levels, tag, length, pos, end, at, max_depth)
            continue
        if level.kind in ("sequence", "fragments"):
            raise Malformed(
                f"Expected an item or the end of a sequence at {at(pos)} but found element "
                f"{_tag(tag)}: the lengths before it do not add up (the file is damaged)."
            )
        vr_bytes = header[4:6]
        if not level.decided:
            looks_explicit = 0x40 < vr_bytes[0] < 0x5B and 0x40 < vr_bytes[1] < 0x5B
            level.implicit = not looks_explicit
            level.decided = True
        header_length = 8
        vr: bytes | None = None
        if level.implicit:
            (length,) = long_struct.unpack(header[4:])
        else:
            if vr_bytes not in KNOWN_VRS:
                raise Malformed(
                    f"Element {_tag(tag)} at {at(pos)} has no valid value representation "
                    f"({vr_bytes!r}): the file is damaged there."
                )
            vr = vr_bytes
            if vr in LONG_VRS:
                more = fp.read(4)
                if len(more) < 4:
                    raise Malformed(
                        f"The file ends inside the header of element {_tag(tag)} at {at(pos)}: "
                        "the file is truncated."
                    )
                (length,) = long_struct.unpack(more)
                header_length = 12
            else:
                (length,) = short_struct.unpack(header[6:])
        value_start = pos + header_length
        if length == UNDEFINED:
            if tag == PIXEL_DATA and level.kind == "dataset" and vr != b"SQ":
                kind, inner_implicit = "fragments", level.implicit
            elif vr in (None, b"SQ", b"UN"):
                # A UN of undefined length holds an implicit VR little endian sequence.
                kind, inner_implicit = "sequence", level.implicit or vr == b"UN"
            else:
                raise Malformed(
                    f"Element {_tag(tag)} at {at(pos)} has an undefined length, which only "
                    "sequences and pixel data may have: the file is damaged there."
                )
            if sum(1 for lv in levels if lv.kind == "sequence") >= max_depth:
                raise Malformed(
                    f"The DICOM header nests sequences more than {max_depth} levels deep."
                )
            levels.append(_Level(kind, pos, inner_implicit, True))
            pos = value_start
            continue
        if value_start + length > end:
            left = max(end - value_start, 0)
            raise Malformed(
                f"The file ends inside element {_tag(tag)} at {at(pos)}: its value should hold "
                f"{length} bytes but only {left} are left (the file is truncated)."
            )
        pos = value_start + length
        fp.seek(pos)


def _delimiter(
    fp: IO[bytes],
    levels: list[_Level],
    tag: tuple[int, int],
    length: int,
    pos: int,
    end: int,
    at: Any,
    max_depth: int,
) -> int:
    """Handle an item or delimiter tag read at `pos - 8`; return where to go on."""
    level = levels[-1]
    start = pos - 8
    if tag == ITEM and level.kind in ("sequence", "fragments"):
        if length == UNDEFINED:
            if level.kind == "fragments":
                raise Malformed(
                    f"A fragment of the pixel data at {at(start)} has an undefined length: "
                    "the file is damaged there."
                )
            # Items of a sequence may be implicit VR whatever their data set says.
            levels.append(_Level("item", start, level.implicit, level.implicit))
            return pos
        if pos + length > end:
            left = max(end - pos, 0)
            raise Malformed(
                f"The file ends inside an item at {at(start)}: it should hold {length} bytes "
                f"but only {left} are left (the file is truncated)."
            )
        fp.seek(pos + length)
        return pos + length
    if tag == ITEM_END and level.kind == "item":
        levels.pop()
        return pos
    if tag == SEQUENCE_END and level.kind in ("sequence", "fragments"):
        levels.pop()
        return pos
    place = {"dataset": "a data set", "item": "an item", "sequence": "a sequence"}
    raise Malformed(
        f"Unexpected {_tag(tag)} inside {place.get(level.kind, 'the pixel data')} at "
        f"{at(start)}: the lengths before it do not add up (the file is damaged)."
    )
