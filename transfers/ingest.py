"""Ingest: the one service every entry point (browser, API, uploader, gateway, CD) stores through.

For each file, on its own:
1. spool the bytes to a temporary file (in memory while small), hashing them on the way and
   zeroing the 128-byte preamble (CVE-2019-11687: a preamble can hold an executable header, so
   the stored copy never carries one);
2. walk the whole file element by element to its last byte (`transfers.dicomio`: a file cut
   anywhere, the padding after the pixel data included, or whose lengths no longer add up is
   refused with where and what), inflating a deflated data set as a bounded stream into a
   temporary file (a decompression bomb is refused, 413); then parse the header with pydicom,
   stopping before the pixel data, and check it: the data set's own identifiers present (never
   the file meta's copies) and valid UIDs, sequence nesting bounded, pixel data as long as its
   header says;
3. deduplicate by SOP Instance UID within the facility (same bytes: nothing to do; other bytes:
   the first copy is kept and the conflict reported);
4. write the object to storage under a key nobody else can pick (the storage writes it whole or
   not at all: relay/storage.py), then commit the rows; if the rows cannot be committed, the
   object is removed again. With an `IngestBatch` (STOW-RS), the rows of up to 50 objects of
   one request are committed in one transaction (see the class).

A fault on our side (the database, the image store or the temporary disk unavailable or full)
is not the file's: it is answered 503 with a reason, and the sender tries again later.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import struct
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time
from typing import IO, Any

import pydicom
from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F
from django.db.models.sql import InsertQuery
from django.http import HttpRequest
from django.utils import timezone
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID

from portal import metrics
from portal.access import acting_facility
from portal.audit import audit_event
from portal.models import AuditAction, AuditEvent, Facility, Outcome, User

from .dicomio import InflateTooLarge, Malformed, dataset_open, inflate_limits
from .models import Instance, Series, Study, StudyStatus
from .purge import study_has_contents
from .queue import task_queue_on_commit
from .uids import is_valid_uid

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
CHUNK = 1024 * 1024
DEFER_BYTES = 1024 * 1024

STORED = "stored"
DUPLICATE = "duplicate"
CONFLICT = "conflict"
REJECTED = "rejected"
# Not the file's fault (storage briefly unreachable): the sender should try again later.
UNAVAILABLE = "unavailable"


class Rejected(Exception):
    """The file is refused; `reason` is shown to the person who sent it."""

    def __init__(self, reason: str, http_status: int = 400, header: Header | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        # Set when the file was identified before it was refused (not in the study asked for).
        self.header = header


@dataclass
class IngestResult:
    status: str
    filename: str = ""
    reason: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    study_uuid: str = ""
    size: int = 0
    sha256: str = ""
    preamble_zeroed: bool = False
    http_status: int = 200
    extra: dict[str, Any] = field(default_factory=dict)
    # For answers that reference the instance (STOW-RS); not in the upload API's JSON.
    sop_class_uid: str = ""
    series_instance_uid: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("http_status", "extra", "sop_class_uid", "series_instance_uid"):
            data.pop(name)
        data.update(self.extra)
        return data


@dataclass
class Spooled:
    file: IO[bytes]
    size: int
    sha256: str
    preamble_zeroed: bool


def human_size(num: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "bytes" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} GiB"


@contextmanager
def spool(chunks: Iterable[bytes], *, expected_size: int | None = None) -> Iterator[Spooled]:
    """Copy an incoming stream to a temporary file, hashing it and zeroing the preamble."""
    limit = settings.RELAY_MAX_UPLOAD_BYTES
    out = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in the finally below
        max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE, dir=settings.FILE_UPLOAD_TEMP_DIR
    )
    try:
        digest = hashlib.sha256()
        size = 0
        head = b""
        head_done = False
        zeroed = False
        incoming = iter(chunks)
        for chunk in incoming:
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise Rejected(f"The file is larger than the {human_size(limit)} limit.", 413)
            if not head_done:
                head += chunk
                if len(head) < 132:
                    continue
                chunk, head, head_done = head, b"", True
                if chunk[128:132] == b"DICM" and any(chunk[:128]):
                    chunk = bytes(128) + chunk[128:]
                    zeroed = True
            digest.update(chunk)
            _spool_write(out, chunk, incoming)
        if not head_done and head:
            digest.update(head)
            _spool_write(out, head, incoming)
        if expected_size is not None and size < expected_size:
            raise Rejected(
                f"The upload was cut off: {size} of {expected_size} bytes arrived. Nothing was stored; send the file again."
            )
        out.seek(0)
        yield Spooled(out, size, digest.hexdigest(), zeroed)
    finally:
        out.close()


def _spool_write(out: IO[bytes], chunk: bytes, incoming: Iterator[bytes]) -> None:
    # Past FILE_UPLOAD_MAX_MEMORY_SIZE the spool is a file: a full or size-limited temporary
    # disk is our fault, not the sender's.
    try:
        out.write(chunk)
    except OSError as exc:
        log.error("temporary file write failed while receiving an upload: %s", exc)
        # The rest is read and dropped (never more than the upload limit), so that the sender
        # gets the answer rather than a broken connection in the middle of its request.
        with suppress(OSError):
            for _ in incoming:
                pass
        raise Rejected(TEMP_DISK_DOWN, 503) from None


def read_chunks(stream: Any, chunk_size: int = CHUNK) -> Iterator[bytes]:
    while True:
        data = stream.read(chunk_size)
        if not data:
            return
        yield data


# --- parsing and checks -------------------------------------------------------------------------


@contextmanager
def _parsed(spooled: Spooled) -> Iterator[tuple[Dataset, IO[bytes], int]]:
    """(the header up to the pixel data, the file its offsets refer to, that file's size): the
    file as received, or the bounded inflated copy of a deflated data set. The whole file is
    walked first, element by element to its last byte, so a damaged file is refused for its
    real fault rather than for what pydicom makes of the damage."""
    if spooled.size == 0:
        raise Rejected("The file is empty (0 bytes).")
    spooled.file.seek(128)
    if spooled.size < 132 or spooled.file.read(4) != b"DICM":
        raise Rejected(
            "Not a DICOM file: there is no 'DICM' marker after the 128-byte preamble (DICOM Part 10)."
        )
    spooled.file.seek(0)
    with ExitStack() as stack:
        try:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            ds, data_fp = stack.enter_context(
                dataset_open(
                    spooled.file,
                    size=spooled.size,
                    stop_before_pixels=True,
                    # Large values (a private blob before the pixel data) stay in the file.
                    defer_size=DEFER_BYTES,
                    limits=inflate_limits(),
                    check_depth=settings.RELAY_MAX_SEQUENCE_DEPTH,
                )
            )
            _reject_if_cut_short(caught)
            position = data_fp.tell()
            data_size = data_fp.seek(0, 2)
            data_fp.seek(position)
        except InflateTooLarge as exc:
            raise Rejected(exc.reason, 413) from None
        except Malformed as exc:
            raise Rejected(exc.reason) from None
        except Rejected:
            raise
        except RecursionError:
            raise Rejected("The DICOM header nests sequences too deeply to be read.") from None
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                # Inflating a deflated data set into a temporary file that cannot grow.
                log.error("temporary file write failed while reading an upload: %s", exc)
                raise Rejected(TEMP_DISK_DOWN, 503) from None
            raise Rejected(f"The DICOM header could not be read: {_short(exc)}") from None
        except Exception as exc:
            raise Rejected(f"The DICOM header could not be read: {_short(exc)}") from None
        yield ds, data_fp, data_size


def _reject_if_cut_short(caught: list[warnings.WarningMessage]) -> None:
    # pydicom reads on past an early end of file and only warns (filereader.read_dataset).
    for warning in caught:
        text = str(warning.message)
        if "end of file" in text.lower():
            raise Rejected(f"The file is truncated: {text.split(' in file ')[0]}.")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _check_structure(ds: Dataset, limit: int) -> None:
    """Walk the header once: values as long as their headers say (a file cut off inside its
    header shows up as a short value), sequences nested at most `limit` deep.

    Only elements that are or may be sequences are converted; turning every value into its
    Python form would cost more than the rest of ingest together.
    """
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for tag, raw in list(current._dict.items()):
            value = getattr(raw, "value", None)
            length = getattr(raw, "length", 0xFFFFFFFF)
            if isinstance(value, bytes) and length != 0xFFFFFFFF and len(value) < length:
                raise Rejected(
                    f"The file is truncated: element {raw.tag} should hold {length} bytes but only {len(value)} are there."
                )
            # An implicit-VR element (VR None) or an unknown one may turn out to be a sequence.
            if raw.VR not in (None, "SQ", "UN"):
                continue
            if value is None and raw.VR != "SQ" and not _sequence_in_dictionary(tag):
                continue  # a large value left in the file (deferred), which no sequence is
            elem = current[tag]
            if elem.VR == "SQ":
                if depth + 1 > limit:
                    raise Rejected(
                        f"The DICOM header nests sequences more than {limit} levels deep."
                    )
                stack.extend((item, depth + 1) for item in elem.value)


def _sequence_in_dictionary(tag: Any) -> bool:
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def _check_pixel_data(fp: IO[bytes], ds: Dataset, ts: UID, file_size: int) -> None:
    """Refuse a file whose pixel data is shorter than its own header says."""
    start = fp.tell()
    if start >= file_size:
        return  # no pixel data (a report, a presentation state)
    endian = "<" if ts.is_little_endian else ">"
    header = fp.read(8)
    if len(header) < 8:
        raise Rejected("The file is cut short inside the pixel data header.")
    tag = struct.unpack(endian + "HH", header[:4])
    if tag not in PIXEL_TAGS:
        return
    # Some writers encode implicit VR under an explicit transfer syntax (pydicom reads on with a
    # warning), so the bytes decide: an explicit VR is two upper-case letters.
    explicit = header[4:6].isalpha() and header[4:6].isupper()
    if not explicit:
        (length,) = struct.unpack(endian + "I", header[4:8])
    elif header[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        more = fp.read(4)
        if len(more) < 4:
            raise Rejected("The file is cut short inside the pixel data header.")
        (length,) = struct.unpack(endian + "I", more)
    else:
        (length,) = struct.unpack(endian + "H", header[6:8])
    value_start = fp.tell()
    remaining = file_size - value_start
    if length == 0xFFFFFFFF:
        _check_fragments(fp, endian, file_size)
        return
    if length > remaining:
        raise Rejected(
            f"The file is truncated: its pixel data should hold {length} bytes but only {remaining} are there."
        )
    if ts.is_encapsulated:
        return
    rows = int(ds.get("Rows") or 0)
    columns = int(ds.get("Columns") or 0)
    try:
        frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        frames = 1
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 0)
    if tag == (0x7FE0, 0x0008):
        bits = 32
    elif tag == (0x7FE0, 0x0009):
        bits = 64
    pixels = rows * columns * frames * samples
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")).startswith("YBR_FULL_422"):
        pixels = rows * columns * frames * 2  # chroma subsampled 2:1 horizontally
    expected = (pixels + 7) // 8 if bits == 1 else pixels * bits // 8
    if length < expected:
        raise Rejected(
            f"The file is truncated: Rows x Columns x frames ({rows} x {columns} x {frames}) needs "
            f"{expected} bytes of pixel data but the file holds {length}."
        )


def _check_fragments(fp: IO[bytes], endian: str, file_size: int) -> None:
    """Walk the items of encapsulated pixel data up to the sequence delimiter."""
    while True:
        header = fp.read(8)
        if len(header) < 8:
            raise Rejected(
                "The file is truncated: its compressed pixel data ends before the last frame."
            )
        group, element, length = struct.unpack(endian + "HHI", header)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise Rejected(
                "The compressed pixel data is malformed (an unexpected tag among its fragments)."
            )
        if fp.tell() + length > file_size:
            raise Rejected(
                "The file is truncated: a compressed frame runs past the end of the file."
            )
        fp.seek(length, 1)


# --- metadata -----------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str, max_length: int) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    # NUL bytes are legal padding in DICOM but PostgreSQL refuses them in text.
    return str(value).replace("\x00", "").strip()[:max_length]


def _date(ds: Dataset, keyword: str) -> date | None:
    raw = _text(ds, keyword, 32).replace(".", "").replace("-", "")
    try:
        return datetime.strptime(raw[:8], "%Y%m%d").date() if len(raw) >= 8 else None  # noqa: DTZ007
    except ValueError:
        return None


def _time(ds: Dataset, keyword: str) -> time | None:
    raw = _text(ds, keyword, 32).replace(":", "").split(".")[0]
    if not raw.isdigit() or len(raw) not in (2, 4, 6):
        return None
    raw = raw.ljust(6, "0")
    try:
        return time(int(raw[:2]), int(raw[2:4]), int(raw[4:6]))
    except ValueError:
        return None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


@dataclass
class Header:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    ds: Dataset


def _identify(ds: Dataset) -> Header:
    meta = getattr(ds, "file_meta", Dataset())
    sop_class = _text(ds, "SOPClassUID", 64)
    if _text(meta, "MediaStorageSOPClassUID", 64) == MEDIA_STORAGE_DIRECTORY:
        sop_class = MEDIA_STORAGE_DIRECTORY
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        raise Rejected(
            "This is a DICOMDIR (the index of a disc), not an image; the files it lists are sent instead."
        )
    ts = _text(meta, "TransferSyntaxUID", 64)
    if not ts:
        raise Rejected("The file meta information has no Transfer Syntax UID.")
    ids = {
        "Study Instance UID": _text(ds, "StudyInstanceUID", 200),
        "Series Instance UID": _text(ds, "SeriesInstanceUID", 200),
        "SOP Instance UID": _text(ds, "SOPInstanceUID", 200),
        "SOP Class UID": sop_class,
    }
    for label, value in ids.items():
        if not value:
            # The file meta's copies of the SOP UIDs are not taken instead: the data set is
            # what is stored, pushed and exported, and it must identify itself.
            raise Rejected(f"The data set has no {label}.{_cut_short_hint(ds, label)}")
        if not is_valid_uid(value):
            raise Rejected(
                f"The {label} is not a valid DICOM UID (digits and dots, at most 64 characters)."
            )
    return Header(
        study_uid=ids["Study Instance UID"],
        series_uid=ids["Series Instance UID"],
        sop_uid=ids["SOP Instance UID"],
        sop_class=sop_class,
        transfer_syntax=ts,
        ds=ds,
    )


IDENTIFIER_TAGS = {
    "Study Instance UID": 0x0020000D,
    "Series Instance UID": 0x0020000E,
    "SOP Instance UID": 0x00080018,
    "SOP Class UID": 0x00080016,
}


def _cut_short_hint(ds: Dataset, label: str) -> str:
    """Elements come in ascending order: a data set that stops before the missing one, with
    no pixel data, was most likely cut off at an element boundary."""
    tags = [int(tag) for tag in ds._dict]
    if not tags or max(tags) >= IDENTIFIER_TAGS[label]:
        return ""
    last = max(tags)
    return (
        f" The data set ends with element ({last >> 16:04X},{last & 0xFFFF:04X}), before "
        "where it would be: the file may have been cut short."
    )


def _study_fields(ds: Dataset) -> dict[str, Any]:
    return {
        "patient_name": _text(ds, "PatientName", 324),
        "patient_id": _text(ds, "PatientID", 64),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
        "patient_birth_date": _date(ds, "PatientBirthDate"),
        "patient_sex": _text(ds, "PatientSex", 16),
        "accession_number": _text(ds, "AccessionNumber", 16),
        "study_id": _text(ds, "StudyID", 16),
        "study_date": _date(ds, "StudyDate"),
        "study_time": _time(ds, "StudyTime"),
        "description": _text(ds, "StudyDescription", 64),
        "referring_physician": _text(ds, "ReferringPhysicianName", 324),
    }


def _series_fields(ds: Dataset) -> dict[str, Any]:
    return {
        "modality": _text(ds, "Modality", 16).upper(),
        "series_number": _int(ds, "SeriesNumber"),
        "description": _text(ds, "SeriesDescription", 64),
        "body_part": _text(ds, "BodyPartExamined", 16),
    }


def storage_key(*, facility: Facility, header: Header) -> str:
    # UIDs were checked against UID_RE, so none of them can climb out of the folder. The random
    # suffix means two uploads of one SOP Instance UID never write to the same object, so the
    # loser of a race can delete what it wrote without touching the winner's copy.
    return (
        f"dicom/{facility.uuid}/{header.study_uid}/{header.series_uid}/"
        f"{header.sop_uid}.{uuid.uuid4().hex[:12]}.dcm"
    )


# --- the service --------------------------------------------------------------------------------


def instance_ingest(
    *,
    facility: Facility,
    user: User | None,
    chunks: Iterable[bytes],
    filename: str = "",
    expected_size: int | None = None,
    source: str = "api",
    request: HttpRequest | None = None,
    batch: IngestBatch | None = None,
    only_study: str | None = None,
    meta_may_differ: bool = False,
    actor_facility: Facility | None = None,
) -> IngestResult:
    """Store one incoming file. Never raises for bad input: the result says what happened.

    A stored file is audited in the same transaction as its rows; every other outcome is
    audited afterwards. With a `batch` (of the same facility, user and request), a stored
    object's rows wait for the batch's transaction: the result says STORED only provisionally,
    and is final (the same object, updated) once `batch.flush()` has run. With `only_study`,
    a file of another study is refused (STOW-RS on /studies/{S}). With `meta_may_differ` (the
    gateway, which writes the file meta itself, naming the sender), a copy whose data set is
    the stored one's byte for byte is a duplicate even when its file meta differs. A caller
    that has checked the sender may upload to `facility` passes it as `actor_facility` (the
    facility the sender acts for), which saves looking it up.
    """
    if batch is not None:
        actor_facility = batch.actor_facility()

    def audit(result: IngestResult) -> AuditEvent:
        """The upload's event, not saved yet (a stored file's is written with its rows)."""
        return audit_event(
            action=AuditAction.UPLOAD,
            request=request,
            actor=user,
            facility=facility,
            actor_facility=actor_facility,
            study_instance_uid=result.study_instance_uid,
            patient_id=result.extra.get("patient_id", ""),
            outcome=Outcome.SUCCESS if result.status in (STORED, DUPLICATE) else Outcome.FAILURE,
            detail=upload_detail(result, source=source, filename=filename),
        )

    try:
        with spool(chunks, expected_size=expected_size) as spooled:
            result = _ingest_spooled(
                facility=facility,
                user=user,
                spooled=spooled,
                filename=filename,
                audit=audit,
                batch=batch,
                only_study=only_study,
                meta_may_differ=meta_may_differ,
            )
    except Rejected as exc:
        if exc.reason == PURGING:
            _purge_finish_soon()
        status = UNAVAILABLE if exc.http_status == 503 else REJECTED
        result = IngestResult(
            status, filename=filename, reason=exc.reason, http_status=exc.http_status
        )
        if exc.header is not None:
            result.sop_instance_uid = exc.header.sop_uid
            result.study_instance_uid = exc.header.study_uid
            result.sop_class_uid = exc.header.sop_class
            result.series_instance_uid = exc.header.series_uid
    if batch is not None and batch.holds(result):
        # Its rows (and its audit event) are the batch's to commit.
        batch.flush_if_full()
        return result
    if result.status != STORED:
        try:
            audit(result).save(force_insert=True)
        except DatabaseError:
            # Nothing was stored, and the database that would hold the record is down.
            log.exception(
                "could not audit a %s upload of %s", result.status, result.sop_instance_uid
            )
    result.extra.pop("patient_id", None)
    _measure(result, source, request)
    return result


def _measure(result: IngestResult, source: str, request: HttpRequest | None) -> None:
    """Count a final result for /metrics, by entry point (portal.metrics.ingest_entry)."""
    agent = request.META.get("HTTP_USER_AGENT", "") if request is not None else ""
    metrics.ingest_measure(source=source, user_agent=agent, outcome=result.status, size=result.size)


NOT_IN_STUDY = "This instance belongs to another study than the one the request names; not stored."
DATABASE_DOWN = "The database is unavailable; nothing was stored. Try again shortly."
PURGING = (
    "An earlier copy of this study is being deleted (its shares ended); nothing was stored. "
    "Send it again in a few minutes."
)
STORAGE_DOWN = "The image store is unavailable; nothing was stored. Try again shortly."
TEMP_DISK_DOWN = (
    "The server could not write the upload to its temporary disk; nothing was stored. "
    "Try again shortly."
)
# Errors of a disk that is full, size-limited, read-only or failing (not of a malformed file).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO})


def _ingest_spooled(
    *,
    facility: Facility,
    user: User | None,
    spooled: Spooled,
    filename: str,
    audit: Callable[[IngestResult], AuditEvent],
    batch: IngestBatch | None = None,
    only_study: str | None = None,
    meta_may_differ: bool = False,
) -> IngestResult:
    with _parsed(spooled) as (ds, data_fp, data_size):
        try:
            header = _identify(ds)
            ts = UID(header.transfer_syntax)
            # A private transfer syntax says nothing pydicom can use about its encoding.
            if ts.is_transfer_syntax and not ts.is_private:
                _check_pixel_data(data_fp, ds, ts, data_size)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _check_structure(ds, settings.RELAY_MAX_SEQUENCE_DEPTH)
            _reject_if_cut_short(caught)
            study_fields = _study_fields(ds)
            series_fields = _series_fields(ds)
            frames = _int(ds, "NumberOfFrames") or 1
            rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
            instance_number = _int(ds, "InstanceNumber")
        except Rejected:
            raise
        except RecursionError:
            raise Rejected("The DICOM header nests sequences too deeply to be read.") from None
        except Exception as exc:
            raise Rejected(f"The DICOM header could not be read: {_short(exc)}") from None

    if only_study is not None and header.study_uid != only_study:
        raise Rejected(NOT_IN_STUDY, 409, header=header)
    result = IngestResult(
        STORED,
        filename=filename,
        sop_instance_uid=header.sop_uid,
        study_instance_uid=header.study_uid,
        size=spooled.size,
        sha256=spooled.sha256,
        preamble_zeroed=spooled.preamble_zeroed,
        extra={"patient_id": study_fields["patient_id"]},
        sop_class_uid=header.sop_class,
        series_instance_uid=header.series_uid,
    )
    if batch is not None and batch.pending_uid(header.sop_uid):
        # A second copy in one request: the first is committed, then compared as usual.
        batch.flush()
    series: Series | None = None
    try:
        if batch is not None:
            # The batch finds each study's copies and series once for all its objects.
            existing = batch.existing(header)
        else:
            existing, series = _lookup(facility, header)
    except DatabaseError as exc:
        log.exception("database unavailable before storing %s", header.sop_uid)
        raise Rejected(DATABASE_DOWN, 503) from exc
    if existing is not None:
        if existing[2]:
            # Its row is in a study a purge has claimed: it is about to go, so it is not stored.
            raise Rejected(PURGING, 503)
        result = _dedup_result(result, existing, spooled.sha256)
        if result.status == CONFLICT and meta_may_differ:
            _same_data_set_check(result, facility, spooled)
        return result

    storage = storages["default"]
    try:
        # Whole or not at all: a write failing partway leaves no object behind.
        key = storage.save(
            storage_key(facility=facility, header=header), File(spooled.file, name="upload.dcm")
        )
    except Exception as exc:  # disk full, bucket unreachable: the sender should retry
        log.exception("storage write failed for %s", header.sop_uid)
        metrics.STORAGE_ERRORS.labels(operation="ingest_write").inc()
        raise Rejected(STORAGE_DOWN, 503) from exc
    pending = _Pending(
        result=result,
        header=Header(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            sop_class=header.sop_class,
            transfer_syntax=header.transfer_syntax,
            ds=Dataset(),  # the parsed header is not kept while the object waits for its rows
        ),
        key=key,
        study_fields=study_fields,
        series_fields=series_fields,
        instance_fields={
            "instance_number": instance_number,
            "rows": rows,
            "columns": columns,
            "number_of_frames": max(frames, 1),
        },
        series=series,
    )
    if batch is not None:
        batch.add(pending)
        return result
    return _commit_one(facility=facility, user=user, pending=pending, audit=audit)


@dataclass
class _Pending:
    """A stored object whose rows are not committed yet."""

    result: IngestResult
    header: Header
    key: str
    study_fields: dict[str, Any]
    series_fields: dict[str, Any]
    instance_fields: dict[str, Any]
    # Its series (with its study, not purged) when it was found before the object was stored.
    series: Series | None = None


def _commit_one(
    *,
    facility: Facility,
    user: User | None,
    pending: _Pending,
    audit: Callable[[IngestResult], AuditEvent],
) -> IngestResult:
    """The rows of one stored object in their own transaction; if they cannot be committed,
    the object is removed again (Rejected for a fault of ours, or the dedup result of a race).

    An object joining a series found before it was stored (the common case) is written on
    PostgreSQL in one statement: its row, its audit event and both counters."""
    storage = storages["default"]
    result, header, key = pending.result, pending.header, pending.key
    try:
        with transaction.atomic():
            if pending.series is not None and connection.vendor == "postgresql":
                result.study_uuid = str(pending.series.study.uuid)
                result.http_status = 201
                _write_one(pending, facility=facility, user=user, event=audit(result))
            else:
                study, series, series_created = _index(
                    facility=facility,
                    user=user,
                    header=header,
                    key=key,
                    size=result.size,
                    sha256=result.sha256,
                    study_fields=pending.study_fields,
                    series_fields=pending.series_fields,
                    instance_fields=pending.instance_fields,
                    series=pending.series,
                )
                result.study_uuid = str(study.uuid)
                result.http_status = 201
                audit(result).save(force_insert=True)
                # Last, so that the study's row is locked (by concurrent uploads into the same
                # study) for as short a time as possible before the commit.
                _count(study=study, series=series, size=result.size, series_created=series_created)
    except BaseException as exc:
        # Whatever stopped it (a lost race, the database, a purge, an interrupt), the rows were
        # not committed, so the object must not stay behind either.
        _delete_quietly(storage, key)
        if isinstance(exc, IntegrityError):
            # Another upload of the same SOP Instance UID may have committed first.
            existing = _existing_or_unavailable(facility, header.sop_uid)
            if existing is not None:
                if existing[2]:
                    raise Rejected(PURGING, 503) from None
                return _dedup_result(result, existing, result.sha256)
        if isinstance(exc, DatabaseError):
            log.exception("rows for %s not committed", header.sop_uid)
            raise Rejected(DATABASE_DOWN, 503) from exc
        raise
    return result


def _delete_quietly(storage: Any, key: str) -> None:
    try:
        storage.delete(key)
    except Exception:
        # The store failed again: the object stays unreferenced until storage_verify finds it.
        log.exception("could not remove %s after its rows were not committed", key)


def _existing_or_unavailable(facility: Facility, sop_uid: str) -> tuple[set[str], str, bool] | None:
    try:
        return _existing(facility, sop_uid)
    except DatabaseError as exc:
        raise Rejected(DATABASE_DOWN, 503) from exc


def _index(
    *,
    facility: Facility,
    user: User | None,
    header: Header,
    key: str,
    size: int,
    sha256: str,
    study_fields: dict[str, Any],
    series_fields: dict[str, Any],
    instance_fields: dict[str, Any],
    series: Series | None = None,
) -> tuple[Study, Series, bool]:
    """The rows for one stored object; called inside the caller's transaction. `series` is
    its series (with its study) when the caller found it already."""
    if series is None:
        # Most instances join a series that already exists: one query finds it and its study.
        series = (
            Series.objects.select_related("study")
            .filter(
                study__facility=facility,
                study__study_instance_uid=header.study_uid,
                series_instance_uid=header.series_uid,
            )
            .first()
        )
    series_created = False
    if series is not None and series.study.purged_at is not None:
        _revive(series.study)
        series = None
    if series is not None:
        study = series.study
    else:
        study, _ = Study.objects.get_or_create(
            facility=facility,
            study_instance_uid=header.study_uid,
            defaults={**study_fields, "uploaded_by": user},
        )
        if study.purged_at is not None:
            _revive(study)
            study.refresh_from_db()
        series, series_created = Series.objects.get_or_create(
            study=study, series_instance_uid=header.series_uid, defaults=series_fields
        )
    # No savepoint: a unique-constraint failure undoes the caller's whole transaction.
    Instance.objects.create(
        facility=facility,
        series=series,
        sop_instance_uid=header.sop_uid,
        sop_class_uid=header.sop_class,
        transfer_syntax_uid=header.transfer_syntax,
        size_bytes=size,
        sha256=sha256,
        storage_key=key,
        uploaded_by=user,
        **instance_fields,
    )
    return study, series, series_created


def _revive(study: Study) -> None:
    """A purged study's UID arrives again (the patient's CD, a resend): the tombstone becomes
    a study again, counted from zero; the purge stays in the audit trail.

    Only once the purge has emptied it: a study claimed but still holding images (a purge
    running, or stopped halfway) refuses the file for now (the sender tries again), so that
    nothing acknowledged is deleted by the purge and nothing the purge must delete is orphaned.
    """
    Study.objects.select_for_update().filter(pk=study.pk).values_list("pk").first()
    if study_has_contents(study):
        raise Rejected(PURGING, 503)
    study.series.all().delete()
    Study.objects.filter(pk=study.pk).update(
        purged_at=None, purged_bytes=0, num_series=0, num_instances=0, size_bytes=0, modalities=""
    )


def _count(*, study: Study, series: Series, size: int, series_created: bool) -> None:
    """Add one instance to its series' and study's counters (F() increments: uploads into one
    study at the same time all count)."""
    Series.objects.filter(pk=series.pk).update(
        num_instances=F("num_instances") + 1, size_bytes=F("size_bytes") + size
    )
    study_update: dict[str, Any] = {
        "num_instances": F("num_instances") + 1,
        "size_bytes": F("size_bytes") + size,
        "last_received_at": timezone.now(),
        "status": StudyStatus.RECEIVING,
        "completed_at": None,
    }
    if series_created:
        # Lock the study row first, so that two new series committed at once both see each
        # other's modality before writing the list.
        Study.objects.select_for_update().filter(pk=study.pk).values_list("pk").first()
        modalities = sorted({m for m in study.series.values_list("modality", flat=True) if m})
        study_update["num_series"] = F("num_series") + 1
        study_update["modalities"] = ("," + ",".join(modalities) + ",") if modalities else ""
    # The update waits for a purge claiming the study at this moment and then sees its mark:
    # the instance is then refused (and rolled back) rather than acknowledged and deleted.
    if not Study.objects.filter(pk=study.pk, purged_at__isnull=True).update(**study_update):
        raise Rejected(PURGING, 503)


def _lookup(
    facility: Facility, header: Header
) -> tuple[tuple[set[str], str, bool] | None, Series | None]:
    """What `_existing` says of the SOP Instance UID, and the series (with its study) the
    object would join, in one query when that series exists (most objects of a study); its
    series is None when it is new, or in a purged study (`_index` revives it).

    Written once as SQL (`_LookupSql`): built through the ORM, with its four subqueries, the
    query took 3.3 ms of Python per object to compile, against 0.6 ms for the whole round trip
    this way, on every upload and every C-STORE."""
    plan = _LookupSql.of(connection)
    with connection.cursor() as cursor:
        cursor.execute(
            plan.sql,
            [facility.pk, header.sop_uid, facility.pk, header.study_uid, header.series_uid],
        )
        row = cursor.fetchone()
    if row is None:
        return _existing(facility, header.sop_uid), None
    series, copy = plan.series(row, connection)
    existing = None
    if copy[0] is not None:
        sha, original, study_uuid, purged_at = copy
        existing = _known_copy(sha, original, study_uuid, purged_at is not None)
    return existing, (series if series.study.purged_at is None else None)


class _LookupSql:
    """`_lookup`'s statement for one database engine, and how to make its row into a Series
    with its Study (each column through the converters Django itself applies)."""

    _made: dict[str, _LookupSql] = {}

    @classmethod
    def of(cls, conn: Any) -> _LookupSql:
        plan = cls._made.get(conn.vendor)
        if plan is None:
            plan = cls._made[conn.vendor] = cls(conn)
        return plan

    def __init__(self, conn: Any) -> None:
        qn = conn.ops.quote_name
        series_t, study_t = qn(Series._meta.db_table), qn(Study._meta.db_table)
        instance_t = qn(Instance._meta.db_table)
        self.series_fields = list(Series._meta.concrete_fields)
        self.study_fields = list(Study._meta.concrete_fields)
        uuid_field = Study._meta.get_field("uuid")
        columns = [f"s.{qn(f.column)}" for f in self.series_fields]
        columns += [f"t.{qn(f.column)}" for f in self.study_fields]
        # Only quoted names from the models go into the text; every value is a parameter. The
        # copy (at most one per facility and UID) is a derived table joined to the series' row,
        # which SQLite and PostgreSQL both take.
        self.sql = (
            f"SELECT {', '.join(columns)}, c.sha256, c.original_sha256, c.uuid, c.purged_at "  # noqa: S608
            f"FROM {series_t} s JOIN {study_t} t ON t.id = s.study_id "
            f"LEFT JOIN (SELECT i.sha256, i.original_sha256, cs.uuid, cs.purged_at "
            f"FROM {instance_t} i JOIN {series_t} css ON css.id = i.series_id "
            f"JOIN {study_t} cs ON cs.id = css.study_id "
            f"WHERE i.facility_id = %s AND i.sop_instance_uid = %s LIMIT 1) c ON 1 = 1 "
            f"WHERE t.facility_id = %s AND t.study_instance_uid = %s "
            f"AND s.series_instance_uid = %s LIMIT 1"
        )

        def converters(model: Any, field: Any) -> tuple[Any, list[Any]]:
            col = field.get_col(model._meta.db_table)
            return col, conn.ops.get_db_converters(col) + field.get_db_converters(conn)

        self.series_conv = [converters(Series, f) for f in self.series_fields]
        self.study_conv = [converters(Study, f) for f in self.study_fields]
        self.uuid_conv = converters(Study, uuid_field)

    @staticmethod
    def _values(conn: Any, convs: list[tuple[Any, list[Any]]], raw: Iterable[Any]) -> list[Any]:
        values = []
        for (col, fns), value in zip(convs, raw, strict=True):
            for fn in fns:
                value = fn(value, col, conn)
            values.append(value)
        return values

    def series(self, row: tuple[Any, ...], conn: Any) -> tuple[Series, tuple[Any, ...]]:
        """The Series (its `study` set) and the copy's (sha256, original, study uuid, purge
        mark), all None when the facility holds no copy."""
        n, m = len(self.series_fields), len(self.study_fields)
        series = Series.from_db(
            conn.alias,
            [f.attname for f in self.series_fields],
            self._values(conn, self.series_conv, row[:n]),
        )
        series.study = Study.from_db(
            conn.alias,
            [f.attname for f in self.study_fields],
            self._values(conn, self.study_conv, row[n : n + m]),
        )
        sha, original, study_uuid, purged_at = row[n + m :]
        if sha is not None:
            study_uuid = str(self._values(conn, [self.uuid_conv], [study_uuid])[0])
        return series, (sha, original, study_uuid, purged_at)


def _write_one(
    pending: _Pending, *, facility: Facility, user: User | None, event: AuditEvent
) -> None:
    """PostgreSQL: the instance's row, its audit event and the counters of its series and
    study in one statement (data-modifying WITH), inside the caller's transaction. The study's
    update waits for a purge claiming it at this moment and then sees its mark: the object is
    then refused and rolled back, as `_count` does.

    The series' row is locked before the study's, as every other writer of the counters does
    (`_count`, the batches): the study's update reads the series update's result, which makes
    PostgreSQL run that first. Left to itself it runs the WITH updates after the main one, and
    a single upload and a batch into the same series then each waited for the other
    (tests/transfers/test_concurrent_ingest.py)."""
    assert pending.series is not None
    series, result = pending.series, pending.result
    instance = Instance(
        facility=facility,
        series=series,
        sop_instance_uid=pending.header.sop_uid,
        sop_class_uid=pending.header.sop_class,
        transfer_syntax_uid=pending.header.transfer_syntax,
        size_bytes=result.size,
        sha256=result.sha256,
        storage_key=pending.key,
        uploaded_by=user,
        **pending.instance_fields,
    )
    instance_sql, instance_params = _insert_sql(instance)
    event_sql, event_params = _insert_sql(event)
    qn = connection.ops.quote_name
    series_table, study_table = qn(Series._meta.db_table), qn(Study._meta.db_table)
    # Only quoted table names and Django's own compiled INSERTs go into the text; every value
    # is a parameter.
    statement = (
        f"WITH i AS ({instance_sql}), a AS ({event_sql}), "  # noqa: S608
        f"s AS (UPDATE {series_table} SET num_instances = num_instances + 1, "
        f"size_bytes = size_bytes + %s WHERE id = %s RETURNING id) "
        f"UPDATE {study_table} SET num_instances = num_instances + 1, "
        f"size_bytes = size_bytes + %s, last_received_at = %s, status = %s, "
        f"completed_at = NULL WHERE id = %s AND purged_at IS NULL "
        f"AND EXISTS (SELECT 1 FROM s) RETURNING id"
    )
    params = [
        *instance_params,
        *event_params,
        result.size,
        series.pk,
        result.size,
        timezone.now(),
        StudyStatus.RECEIVING.value,
        series.study_id,
    ]
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        if cursor.fetchone() is None:
            raise Rejected(PURGING, 503)


def _insert_sql(obj: Any) -> tuple[str, list[Any]]:
    """The INSERT Django would run to save `obj` (a new row, its defaults applied)."""
    model = type(obj)
    fields = [f for f in model._meta.local_concrete_fields if not f.primary_key]
    query = InsertQuery(model)
    query.insert_values(fields, [obj])
    [(sql, params)] = query.get_compiler(connection=connection).as_sql()
    return sql, list(params)


def _known_copy(
    sha256: str, original_sha256: str, study_uuid: Any, purged: bool
) -> tuple[set[str], str, bool]:
    """A stored copy as dedup compares with it: (the SHA-256s it is known by: its own, and the
    one it arrived with when it was rewritten since by patient reconciliation; its study's
    uuid; whether a purge claimed that study)."""
    return {sha256, original_sha256} - {""}, str(study_uuid), purged


def _existing(facility: Facility, sop_uid: str) -> tuple[set[str], str, bool] | None:
    """The copy this facility holds of this SOP Instance UID, if any (`_known_copy`)."""
    rows = Instance.objects.filter(facility=facility, sop_instance_uid=sop_uid).values_list(
        "sha256", "original_sha256", "series__study__uuid", "series__study__purged_at"
    )[:1]
    if not rows:
        return None
    sha, original, study_uuid, purged_at = rows[0]
    return _known_copy(sha, original, study_uuid, purged_at is not None)


def _purge_finish_soon() -> None:
    """A purge stopped halfway holds up uploads of its study: run it now, not at night."""
    task_queue_on_commit("transfers.tasks.purge_expired")


def _dedup_result(
    result: IngestResult, existing: tuple[set[str], str, bool], sha256: str
) -> IngestResult:
    known, result.study_uuid, _ = existing
    if sha256 in known:
        result.status = DUPLICATE
        result.reason = "Already stored with the same content; nothing to do."
        result.http_status = 200
    else:
        result.status = CONFLICT
        result.reason = (
            "An instance with this SOP Instance UID is already stored with different content; "
            "the first copy was kept."
        )
        result.http_status = 409
    return result


def _data_set_digest(fp: IO[bytes]) -> str | None:
    """SHA-256 of a Part 10 file's data set, after its preamble and file meta group; None when
    the group does not start with its length (then only the whole file can be compared)."""
    fp.seek(128 + 4)
    head = fp.read(12)
    if len(head) < 12 or head[:6] != b"\x02\x00\x00\x00UL":
        return None
    (group_length,) = struct.unpack("<I", head[8:12])
    fp.seek(128 + 4 + 12 + group_length)
    digest = hashlib.sha256()
    while chunk := fp.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _same_data_set_check(result: IngestResult, facility: Facility, spooled: Spooled) -> None:
    """A conflict that is only the file meta (the same instance sent again by another calling
    AE title, whose name the gateway writes into the meta) is a duplicate."""
    key = (
        Instance.objects.filter(facility=facility, sop_instance_uid=result.sop_instance_uid)
        .values_list("storage_key", flat=True)
        .first()
    )
    if key is None:
        return
    try:
        with storages["default"].open(key) as stored:
            theirs = _data_set_digest(stored)
    except OSError:
        return
    ours = _data_set_digest(spooled.file)
    spooled.file.seek(0)
    if theirs is not None and theirs == ours:
        result.status = DUPLICATE
        result.reason = "Already stored with the same data set (sent before by another AE title)."
        result.http_status = 200


def upload_detail(result: IngestResult, *, source: str, filename: str) -> dict[str, Any]:
    """The detail of an upload's audit event, one per file whatever the path."""
    return {
        "status": result.status,
        "source": source,
        "filename": filename[:200],
        "sop_instance_uid": result.sop_instance_uid,
        "size": result.size,
        "reason": result.reason,
    }


# --- batches: the index writes of one request together ------------------------------------------

# Objects stored and waiting for their rows: at most this many, then one transaction for all.
BATCH_INSTANCES = 50


# A batch reads the copies a study holds once, up to this many (beyond, one query per object).
KNOWN_PER_STUDY = 20_000
# Marks a study with more copies than that.
_TOO_MANY: dict[str, tuple[set[str], str, bool]] = {}


class _Fallback(Exception):
    """The batch cannot be written as one (a purged study to revive): each on its own."""


class IngestBatch:
    """The rows of several stored objects of one request (one facility, one sender) committed in
    one transaction: each study and series looked up once, the instances and their audit events
    inserted together, the counters of each series and study updated once.

    Nothing changes in what is acknowledged: an object's rows are committed before its result
    is final (the caller answers after `flush()`), a stored file's audit event commits with
    its rows, and an object whose rows are not committed is removed again. When the batch
    cannot be committed as one (a lost race on a UID, a study purged or being purged, the
    database), it is rolled back and each object's rows are committed on their own as
    `instance_ingest` does without a batch, with the same outcomes and audit.

    Use as a context manager: what is still pending is committed on the way out (removed
    instead when the process is being stopped).
    """

    def __init__(
        self,
        *,
        facility: Facility,
        user: User | None,
        source: str,
        request: HttpRequest | None = None,
        size: int = BATCH_INSTANCES,
        actor_facility: Facility | None = None,
    ) -> None:
        self.facility = facility
        self.user = user
        self.source = source
        self.request = request
        self.size = size
        self._pending: list[_Pending] = []
        self._filenames: dict[int, str] = {}
        # Study UID -> the copies it holds (SOP Instance UID -> what _existing says).
        self._known: dict[str, dict[str, tuple[set[str], str, bool]]] = {}
        # Known when the caller checked the sender may upload to `facility`.
        self._actor_facility: tuple[Facility | None] | None = (
            (actor_facility,) if actor_facility is not None else None
        )

    def __enter__(self) -> IngestBatch:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if kind is None or issubclass(kind, Exception):
            self.flush()
        else:
            # Stopped (an interrupt, a worker timeout): nothing more is written; what has no
            # rows goes again.
            for pending in self._pending:
                _delete_quietly(storages["default"], pending.key)
            self._pending.clear()

    def actor_facility(self) -> Facility | None:
        """The facility the sender acts for, looked up once per batch."""
        if self._actor_facility is None:
            self._actor_facility = (acting_facility(self._actor(), self.facility),)
        return self._actor_facility[0]

    def _actor(self) -> User | None:
        if self.user is not None:
            return self.user
        request_user = getattr(self.request, "user", None)
        return request_user if getattr(request_user, "is_authenticated", False) else None  # type: ignore[return-value]

    def holds(self, result: IngestResult) -> bool:
        return any(pending.result is result for pending in self._pending)

    def pending_uid(self, sop_uid: str) -> bool:
        return any(pending.header.sop_uid == sop_uid for pending in self._pending)

    def existing(self, header: Header) -> tuple[set[str], str, bool] | None:
        """What `_existing` says of the object's SOP Instance UID, from the copies its study
        holds, read once per study and request (a study of more than KNOWN_PER_STUDY objects
        is asked per object). A copy under the same UID in another study is not in that list:
        the unique constraint then refuses the batch's rows, and the fallback to one object at
        a time finds it, with the same outcome."""
        known = self._known.get(header.study_uid)
        if known is None:
            known = self._known[header.study_uid] = self._study_copies(header.study_uid)
        if known is _TOO_MANY:
            return _existing(self.facility, header.sop_uid)
        return known.get(header.sop_uid)

    def _study_copies(self, study_uid: str) -> dict[str, tuple[set[str], str, bool]]:
        study = (
            Study.objects.filter(facility=self.facility, study_instance_uid=study_uid)
            .values("pk", "uuid", "purged_at", "num_instances")
            .first()
        )
        if study is None:
            return {}
        if study["num_instances"] > KNOWN_PER_STUDY:
            return _TOO_MANY
        purged = study["purged_at"] is not None
        return {
            sop: _known_copy(sha, original, study["uuid"], purged)
            for sop, sha, original in Instance.objects.filter(
                facility=self.facility, series__study_id=study["pk"]
            ).values_list("sop_instance_uid", "sha256", "original_sha256")
        }

    def _remember(self, items: list[_Pending]) -> None:
        """Objects whose rows were committed are known copies for the rest of the request."""
        for item in items:
            known = self._known.get(item.header.study_uid)
            if item.result.status == STORED and known is not None and known is not _TOO_MANY:
                known[item.header.sop_uid] = ({item.result.sha256}, item.result.study_uuid, False)

    def add(self, pending: _Pending) -> None:
        pending.result.study_uuid = ""
        self._pending.append(pending)

    def flush_if_full(self) -> None:
        if len(self._pending) >= self.size:
            self.flush()

    def flush(self) -> None:
        """Commit the rows of every pending object; afterwards each result is final."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            with transaction.atomic():
                self._write(pending)
            for item in pending:
                item.result.extra.pop("patient_id", None)
        except (DatabaseError, Rejected, _Fallback) as exc:
            if not isinstance(exc, _Fallback):
                log.info("batch of %d rolled back (%s); committing one by one", len(pending), exc)
            for item in pending:
                self._commit_alone(item)
        except BaseException:
            for item in pending:
                _delete_quietly(storages["default"], item.key)
            raise
        self._remember(pending)
        for item in pending:  # final now
            _measure(item.result, self.source, self.request)

    def _audit(self, result: IngestResult, patient_id: str) -> AuditEvent:
        """The event of an upload, not saved yet (inserted with the batch's others)."""
        return audit_event(
            action=AuditAction.UPLOAD,
            request=self.request,
            actor=self._actor(),
            facility=self.facility,
            actor_facility=self.actor_facility(),
            study_instance_uid=result.study_instance_uid,
            patient_id=patient_id,
            outcome=Outcome.SUCCESS if result.status in (STORED, DUPLICATE) else Outcome.FAILURE,
            detail=upload_detail(result, source=self.source, filename=result.filename),
        )

    def _write(self, items: list[_Pending]) -> None:
        """All rows of `items`, inside the caller's transaction."""
        facility, user = self.facility, self.user
        studies = {
            study.study_instance_uid: study
            for study in Study.objects.filter(
                facility=facility, study_instance_uid__in={p.header.study_uid for p in items}
            )
        }
        if any(study.purged_at is not None for study in studies.values()):
            raise _Fallback  # a tombstone to revive (or a purge running): _index does it
        for item in items:
            if item.header.study_uid not in studies:
                studies[item.header.study_uid] = Study.objects.create(
                    facility=facility,
                    study_instance_uid=item.header.study_uid,
                    uploaded_by=user,
                    **item.study_fields,
                )
        by_pk = {study.pk: study for study in studies.values()}
        series_of: dict[tuple[int, str], Series] = {
            (series.study_id, series.series_instance_uid): series
            for series in Series.objects.filter(
                study_id__in=list(by_pk),
                series_instance_uid__in={p.header.series_uid for p in items},
            )
        }
        new_series: dict[int, int] = {}  # study pk -> series created
        for item in items:
            study = studies[item.header.study_uid]
            where = (study.pk, item.header.series_uid)
            if where not in series_of:
                series_of[where] = Series.objects.create(
                    study=study, series_instance_uid=item.header.series_uid, **item.series_fields
                )
                new_series[study.pk] = new_series.get(study.pk, 0) + 1
        instances = []
        added: dict[int, list[int]] = {}  # series pk -> [instances, bytes]
        for item in items:
            study = studies[item.header.study_uid]
            series = series_of[(study.pk, item.header.series_uid)]
            instances.append(
                Instance(
                    facility=facility,
                    series=series,
                    sop_instance_uid=item.header.sop_uid,
                    sop_class_uid=item.header.sop_class,
                    transfer_syntax_uid=item.header.transfer_syntax,
                    size_bytes=item.result.size,
                    sha256=item.result.sha256,
                    storage_key=item.key,
                    uploaded_by=user,
                    **item.instance_fields,
                )
            )
            item.result.study_uuid = str(study.uuid)
            item.result.http_status = 201
            counts = added.setdefault(series.pk, [0, 0])
            counts[0] += 1
            counts[1] += item.result.size
        Instance.objects.bulk_create(instances)
        AuditEvent.objects.bulk_create(
            [self._audit(item.result, item.result.extra.get("patient_id", "")) for item in items]
        )
        for series_pk, (count, nbytes) in sorted(added.items()):
            Series.objects.filter(pk=series_pk).update(
                num_instances=F("num_instances") + count, size_bytes=F("size_bytes") + nbytes
            )
        # Last, in the order of their keys (two batches never wait on each other in a circle).
        study_added: dict[int, list[int]] = {}
        for series in series_of.values():
            if series.pk in added:
                counts = study_added.setdefault(series.study_id, [0, 0])
                counts[0] += added[series.pk][0]
                counts[1] += added[series.pk][1]
        for study_pk, (count, nbytes) in sorted(study_added.items()):
            study_update: dict[str, Any] = {
                "num_instances": F("num_instances") + count,
                "size_bytes": F("size_bytes") + nbytes,
                "last_received_at": timezone.now(),
                "status": StudyStatus.RECEIVING,
                "completed_at": None,
            }
            if study_pk in new_series:
                # As _count: the study row locked before the modality list is read and written.
                Study.objects.select_for_update().filter(pk=study_pk).values_list("pk").first()
                modalities = sorted(
                    {m for m in by_pk[study_pk].series.values_list("modality", flat=True) if m}
                )
                study_update["num_series"] = F("num_series") + new_series[study_pk]
                study_update["modalities"] = (
                    ("," + ",".join(modalities) + ",") if modalities else ""
                )
            if not Study.objects.filter(pk=study_pk, purged_at__isnull=True).update(**study_update):
                raise Rejected(PURGING, 503)

    def _commit_alone(self, item: _Pending) -> None:
        """One object's rows on their own, as without a batch; its result and audit final."""
        result = item.result
        result.study_uuid = ""
        patient_id = result.extra.get("patient_id", "")

        def audit(outcome: IngestResult) -> AuditEvent:
            return self._audit(outcome, patient_id)

        try:
            _commit_one(facility=self.facility, user=self.user, pending=item, audit=audit)
        except Rejected as exc:
            if exc.reason == PURGING:
                _purge_finish_soon()
            result.status = UNAVAILABLE if exc.http_status == 503 else REJECTED
            result.reason = exc.reason
            result.http_status = exc.http_status
        if result.status != STORED:
            try:
                audit(result).save(force_insert=True)
            except DatabaseError:
                log.exception(
                    "could not audit a %s upload of %s", result.status, result.sop_instance_uid
                )
        result.extra.pop("patient_id", None)
