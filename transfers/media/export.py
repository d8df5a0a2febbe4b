"""Export for download: studies laid out as IHE PDI media, streamed as a ZIP or built as a CD image.

The media hold, at the root, a DICOMDIR (built with pydicom's FileSet), README.TXT, the images
under 8-character upper-case File IDs (PS3.10 section 8: at most 8 components of A-Z, 0-9 and
_), and the reports under REPORT/. The stored DICOM objects go on the media byte for byte; the
DICOMDIR references each with the transfer syntax it was stored in. A directory record whose
text is not ASCII says ISO_IR 192 (UTF-8) as its own Specific Character Set; the File-set ID,
RELAY_ and ten hexadecimal digits, is also the disc's volume label and names no patient.

Beside the DICOM file-set, as the other content IHE PDI allows (8.3 names, outside the DICOM
folders): INDEX.HTM, the contents page, and VIEWER/, a viewer that runs in any browser from the
disc or the unzipped folder with no server (`disc_viewer`, where the design is explained). Its
frames are made from the stored images as they are written, one at a time, last on the media;
the first download keeps each frame file next to the image's render and later ones copy it
(`disc_viewer`'s frame cache). A ZIP for a PACS import can leave the viewer out
(`ExportPlan.without_viewer`, `?viewer=0` on the download).

Planning reads only the DICOM headers, one object at a time and never the pixel data; the ZIP and
the ISO read the objects from storage in chunks while they are written, so neither a whole study
nor a temporary copy of it is ever held in memory or on disk. Both read through
`integrity.VerifyingReader`: an object that does not match its recorded SHA-256 and size raises
`integrity.IntegrityError` before its last bytes are written, and the ZIP or ISO is not finished.
So every byte of an image passes through Python (hashed, and CRC-32'd for the ZIP): no sendfile.
What is done for speed: 1 MiB reads handed on as they are (no joining or slicing), and on a
folder storage the kernel is asked to read the next objects ahead (`_read_ahead`), so that
the disc works while the current one is hashed and sent.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.utils import timezone
from zipstream import ZIP_STORED, ZipStream

from .. import dicomio
from ..integrity import VerifyingReader, verified_open
from ..models import Instance, Report, Series, Study
from .disc_viewer import viewer_files

if TYPE_CHECKING:
    import pycdlib
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.fileset import FileSet

# pydicom and pycdlib are imported inside the functions that read or write headers and discs:
# the media views import this module, and a web worker serving pages loads no pixel code
# (pydicom's own import loads numpy, Pillow and the JPEG decoders;
# tests/relay/test_lean_imports.py).

CHUNK = 1024 * 1024
# Stored objects the disc is asked to read ahead of the one being written into the ZIP.
PREFETCH = 2
PREFETCH_BYTES = 8 * CHUNK  # of each: a large multi-frame object is read ahead as it is read
SECTOR = 2048
# The capacities that every drive accepts: an 80-minute CD-R and a single-layer DVD+R (the
# smaller of DVD-R and DVD+R).
CD_BYTES = 360_000 * SECTOR
DVD_BYTES = 2_295_104 * SECTOR
# Header values longer than this are not needed for a directory record (private blobs, overlays,
# an encapsulated PDF); pydicom skips over them instead of reading them.
DEFER_BYTES = 64 * 1024
FILE_ID_RE = re.compile(r"^[A-Z0-9_]{1,8}(/[A-Z0-9_]{1,8}){0,7}$")
MEDIA_NAME_RE = re.compile(r"^[A-Z0-9_]{1,8}(\.[A-Z0-9_]{1,3})?$")
# The File-set ID (CS, at most 16 characters) is also the disc's volume identifier (PS3.12
# F.1.1), so it has to be both: upper-case A-Z, 0-9 and _ are legal in each, and 16 characters
# also fit the Joliet label (UCS-2 in 32 bytes), so both volume descriptors say the same.
VOLUME_LABEL_RE = re.compile(r"^[A-Z0-9_]{1,16}$")
FILE_SET_PREFIX = "RELAY_"
FILE_SET_ID_DIGITS = 10
# Directory records whose text is not plain ASCII carry this Specific Character Set (UTF-8).
UTF8 = "ISO_IR 192"
# Changed whenever the DICOMDIR built from the same study changes, so that a DICOMDIR cached
# by an earlier version is not served again (2: File-set ID and character sets).
DICOMDIR_VERSION = 2


class ExportError(Exception):
    """The studies cannot be exported; the message can be shown to the person asking."""


@dataclass(frozen=True)
class MediaFile:
    """One file on the media: read from storage (`storage_key`) or held as `data`."""

    path: str  # relative, "/"-separated, every component a PS3.10 name
    size: int
    storage_key: str = ""
    data: bytes = b""
    sha256: str = ""  # of a stored DICOM object, as Instance.sha256
    # Made when it is written (the disc viewer's frames): exactly `size` bytes, one at a time.
    produce: Callable[[], bytes] | None = None


@dataclass
class StudyMedia:
    study: Study
    instances: list[MediaFile] = field(default_factory=list)
    reports: list[MediaFile] = field(default_factory=list)


@dataclass
class ExportPlan:
    """What goes on the media, in the order it is written."""

    studies: list[StudyMedia]
    file_set_id: str  # the DICOMDIR's File-set ID and the disc's volume identifier
    dicomdir: MediaFile
    readme: MediaFile
    total_bytes: int  # every file's content, before ZIP or ISO framing
    image_bytes: int  # the DICOM objects only: what is billed
    images: int
    # INDEX.HTM and the disc viewer's pages and scripts, and its frames (disc_viewer.py).
    viewer: list[MediaFile] = field(default_factory=list)
    frames: list[MediaFile] = field(default_factory=list)

    @property
    def files(self) -> list[MediaFile]:
        # README and DICOMDIR first: a reader that stops early still sees what the media hold.
        # The viewer's frames come last: made from the images, they are the least needed.
        files = [self.readme, self.dicomdir, *self.viewer]
        for study in self.studies:
            files.extend(study.instances)
        for study in self.studies:
            files.extend(study.reports)
        files.extend(self.frames)
        return files

    def without_viewer(self) -> ExportPlan:
        """The same media without INDEX.HTM and VIEWER/ (a disc they would not fit on)."""
        data = _readme(self.studies, viewer=False)
        readme = MediaFile(path=self.readme.path, size=len(data), data=data)
        extra = sum(f.size for f in (*self.viewer, *self.frames)) + self.readme.size - readme.size
        return replace(
            self, readme=readme, viewer=[], frames=[], total_bytes=self.total_bytes - extra
        )


# --- planning -----------------------------------------------------------------------------------


def export_plan(
    *, studies: list[Study], reports_of: Callable[[Study], Iterable[Report]]
) -> ExportPlan:
    """Lay out the studies as IHE PDI media: File IDs, DICOMDIR, reports and README.

    `reports_of` says which reports of each study go on it: those its recipient may read
    (transfers.reports.reports_visible), never simply all of them."""
    if not studies:
        raise ExportError("There is nothing to export: no study was chosen.")
    storage = storages["default"]
    planned: list[tuple[StudyMedia, list[Instance]]] = []
    seen: set[str] = set()
    for study in studies:
        if study.purged_at is not None:
            raise ExportError(
                f"The images of {_describe(study)} were deleted after their shares expired."
            )
        instances = list(
            Instance.objects.filter(series__study=study)
            .select_related("series")
            .order_by(
                "series__series_number", "series__created_at", "series_id", "instance_number", "id"
            )
        )
        if not instances:
            raise ExportError(f"{_describe(study).capitalize()} holds no images yet.")
        kept: list[Instance] = []
        for instance in instances:
            # One File ID per SOP Instance UID: a second copy (two facilities' studies exported
            # together) would make the DICOMDIR ambiguous.
            if instance.sop_instance_uid in seen:
                continue
            seen.add(instance.sop_instance_uid)
            kept.append(instance)
        planned.append((StudyMedia(study=study), kept))

    file_set_id = file_set_id_for(studies)
    cache_key = _dicomdir_cache_key(planned, file_set_id)
    cached = _dicomdir_cached(storage, cache_key)
    if cached is None:
        dicomdir, file_ids = _dicomdir_build(storage, planned, file_set_id)
        _dicomdir_cache(storage, cache_key, dicomdir, file_ids)
    else:
        dicomdir, file_ids = cached
        for _, kept in planned:
            for instance in kept:
                if not _needs_header(instance, instance.series):
                    _check_size(storage, instance)
    for media, kept in planned:
        for instance in kept:
            file_id = file_ids.get(instance.sop_instance_uid)
            if file_id is None or not FILE_ID_RE.match(file_id):
                raise ExportError(f"No valid File ID for image {instance.sop_instance_uid}.")
            media.instances.append(
                MediaFile(
                    path=file_id,
                    size=instance.size_bytes,
                    storage_key=instance.storage_key,
                    sha256=instance.sha256,
                )
            )
    _plan_reports(storage, [media for media, _ in planned], reports_of)
    studies_media = [media for media, _ in planned]
    readme_bytes = _readme(studies_media)
    readme = MediaFile(path="README.TXT", size=len(readme_bytes), data=readme_bytes)
    dicomdir_file = MediaFile(path="DICOMDIR", size=len(dicomdir), data=dicomdir)
    image_bytes = sum(f.size for m in studies_media for f in m.instances)
    report_bytes = sum(f.size for m in studies_media for f in m.reports)
    pages, frames = viewer_files(
        [(media.study, kept) for media, kept in planned],
        [(media.study, [f.path for f in media.reports]) for media in studies_media],
    )
    viewer = [MediaFile(path=f.path, size=f.size, data=f.data) for f in pages]
    viewer_frames = [MediaFile(path=f.path, size=f.size, produce=f.produce) for f in frames]
    viewer_bytes = sum(f.size for f in (*viewer, *viewer_frames))
    return ExportPlan(
        studies=studies_media,
        file_set_id=file_set_id,
        dicomdir=dicomdir_file,
        readme=readme,
        total_bytes=readme.size + dicomdir_file.size + image_bytes + report_bytes + viewer_bytes,
        image_bytes=image_bytes,
        images=sum(len(m.instances) for m in studies_media),
        viewer=viewer,
        frames=viewer_frames,
    )


def _dicomdir_build(
    storage: Storage, planned: list[tuple[StudyMedia, list[Instance]]], file_set_id: str
) -> tuple[bytes, dict[str, str]]:
    """The DICOMDIR of the planned instances (pydicom's FileSet) and each one's File ID."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    fileset.ID = file_set_id
    for study_number, (media, kept) in enumerate(planned, start=1):
        series_numbers: dict[int, int] = {}
        positions: dict[int, int] = {}
        for instance in kept:
            series = instance.series
            series_numbers.setdefault(series.pk, len(series_numbers) + 1)
            positions[series.pk] = positions.get(series.pk, 0) + 1
            if _needs_header(instance, series):
                header = _read_header(storage, instance)
            else:
                _check_size(storage, instance)
                header = _header_from_rows(media.study, series, instance)
            _fill_record_keys(
                header,
                study=media.study,
                series=series,
                instance=instance,
                study_number=study_number,
                series_number=series_numbers[series.pk],
                position=positions[series.pk],
            )
            _record_character_set(header)
            try:
                fileset.add(header)
            except (ValueError, KeyError, AttributeError) as exc:
                raise ExportError(
                    f"Image {instance.sop_instance_uid} cannot be listed in a DICOMDIR: {exc}"
                ) from exc
    return _write_dicomdir(fileset)


# --- the DICOMDIR cache ---------------------------------------------------------------------
# Building a DICOMDIR costs seconds for a large study (pydicom's FileSet stages every record),
# and it is the same for every download until the study changes. It is kept in storage next to
# the study's disc images, under a fingerprint of everything it is made of, so a changed study
# (new instance, reconciled patient, rewritten copy) simply misses; the purge deletes it.


def _dicomdir_cache_key(
    planned: list[tuple[StudyMedia, list[Instance]]], file_set_id: str
) -> str | None:
    if len(planned) != 1:
        return None  # several studies on one medium: rare, built each time
    media, kept = planned[0]
    study = media.study
    digest = hashlib.sha256()
    digest.update(f"v{DICOMDIR_VERSION}|{file_set_id}\n".encode())
    identity = (
        study.patient_id, study.patient_name, study.study_instance_uid, str(study.study_date),
        str(study.study_time), study.study_id, study.accession_number, study.description,
    )  # fmt: skip
    digest.update(repr(identity).encode())
    for instance in kept:
        series = instance.series
        digest.update(
            f"{instance.sop_instance_uid}|{instance.sha256}|{instance.instance_number}|"
            f"{series.series_instance_uid}|{series.series_number}|{series.modality}\n".encode()
        )
    return f"exports/{study.facility.uuid}/{study.uuid}/dicomdir-{digest.hexdigest()[:32]}.json"


def _dicomdir_cached(storage: Storage, key: str | None) -> tuple[bytes, dict[str, str]] | None:
    if key is None:
        return None
    try:
        with storage.open(key, "rb") as f:
            saved = json.loads(f.read())
        return base64.b64decode(saved["dicomdir"]), dict(saved["file_ids"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: built again


def _dicomdir_cache(
    storage: Storage, key: str | None, dicomdir: bytes, file_ids: dict[str, str]
) -> None:
    if key is None or storage.exists(key):
        return
    payload = json.dumps(
        {"dicomdir": base64.b64encode(dicomdir).decode(), "file_ids": file_ids}
    ).encode()
    try:
        storage.save(key, ContentFile(payload))
    except OSError:
        pass  # a cache: the next download builds it again


def export_plan_warm(*, study: Study) -> None:
    """Build and keep the study's DICOMDIR ahead of the first download (after rendering)."""
    try:
        # Reports play no part in the DICOMDIR; each download adds its reader's own.
        export_plan(studies=[study], reports_of=lambda _: ())
    except ExportError:
        pass


def _describe(study: Study) -> str:
    # Error messages end up in logs and task results: the date and modalities say which study
    # without naming the patient.
    when = f"{study.study_date:%Y-%m-%d}" if study.study_date else "undated"
    return f"the {when} {'/'.join(study.modality_list)} study".replace("  ", " ")


def _read_header(storage: Storage, instance: Instance) -> Dataset:
    """The object's header without its pixel data and without any long value."""
    from pydicom.dataelem import DataElement, RawDataElement

    try:
        with storage.open(instance.storage_key, "rb") as fh:
            if fh.size != instance.size_bytes:
                raise ExportError(
                    f"The stored copy of image {instance.sop_instance_uid} has {fh.size} bytes, "
                    f"not the {instance.size_bytes} it had when it was received."
                )
            ds, data_fp = dicomio.dataset_read(fh, stop_before_pixels=True, defer_size=DEFER_BYTES)
            if data_fp is not fh:
                data_fp.close()  # a deflated copy's inflated data: nothing more is read from it
            for tag in list(ds.keys()):
                # No directory record uses private elements, and FileSet writes every element
                # of the copy it is given: dropping them keeps that copy small.
                if tag.is_private:
                    del ds[tag]
                    continue
                # Deferred values would be read back through the file's name, which is a
                # storage key and not a path: they are emptied now, before anything asks.
                raw = ds.get_item(tag, keep_deferred=True)
                if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
                    ds[tag] = DataElement(tag, raw.VR or _dictionary_vr(tag), None)
    except FileNotFoundError as exc:
        raise ExportError(
            f"The stored copy of image {instance.sop_instance_uid} is missing."
        ) from exc
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"The stored copy of image {instance.sop_instance_uid} could not be read: {exc}"
        ) from exc
    return ds


# The SOP classes whose directory records need more than the index holds (RT, presentation
# states, SR, encapsulated documents...): pydicom's own table of them. Everything else is an
# IMAGE record, which needs only what the Study, Series and Instance rows already say.
@functools.cache
def _other_record_classes() -> frozenset[str]:
    import pydicom.fileset

    return frozenset(getattr(pydicom.fileset, "_FOUR_LEVEL_SOP_CLASSES", None) or ())


_OTHER_RECORD_MODALITIES = {"RTINTENT", "RTSEGANN", "RTRAD", "PLAN", "RTPLAN"}
# Encapsulated PDF, CDA, STL, OBJ, MTL: ENCAP DOC records.
ENCAPSULATED_DOCUMENTS = "1.2.840.10008.5.1.4.1.1.104."
# RT objects (plans are recognised by their content, not their class, in pydicom's table).
RADIOTHERAPY = "1.2.840.10008.5.1.4.1.1.481."


def _needs_header(instance: Instance, series: Series) -> bool:
    other_classes = _other_record_classes()
    if not other_classes:
        return True  # pydicom changed its table: read every header, slower but right
    return (
        instance.sop_class_uid in other_classes
        or series.modality.upper() in _OTHER_RECORD_MODALITIES
        or instance.sop_class_uid.startswith((ENCAPSULATED_DOCUMENTS, RADIOTHERAPY))
    )


def _check_size(storage: Storage, instance: Instance) -> None:
    """The stored copy is there with the size it had: otherwise no half-made ZIP is sent."""
    try:
        size = storage.size(instance.storage_key)
    except FileNotFoundError as exc:
        raise ExportError(
            f"The stored copy of image {instance.sop_instance_uid} is missing."
        ) from exc
    except Exception as exc:
        raise ExportError(
            f"The stored copy of image {instance.sop_instance_uid} could not be read: {exc}"
        ) from exc
    if size != instance.size_bytes:
        raise ExportError(
            f"The stored copy of image {instance.sop_instance_uid} has {size} bytes, "
            f"not the {instance.size_bytes} it had when it was received."
        )


def _header_from_rows(study: Study, series: Series, instance: Instance) -> Dataset:
    """What an IMAGE record and its parents need, from the index: no read from storage.

    Reading 300 headers from storage was most of the time to a ZIP's first byte; the rows hold
    the same values, taken from the same headers when the files arrived."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax_uid)
    ds.file_meta.MediaStorageSOPClassUID = UID(instance.sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(instance.sop_instance_uid)
    ds.SOPClassUID = instance.sop_class_uid
    ds.SOPInstanceUID = instance.sop_instance_uid
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ds.StudyInstanceUID = study.study_instance_uid
    if study.study_date:
        ds.StudyDate = study.study_date.strftime("%Y%m%d")
    if study.study_time:
        ds.StudyTime = study.study_time.strftime("%H%M%S")
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.description
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.Modality = series.modality
    if series.series_number is not None:
        ds.SeriesNumber = series.series_number
    if instance.instance_number is not None:
        ds.InstanceNumber = instance.instance_number
    return ds


def _dictionary_vr(tag: Any) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    # Ambiguous VRs ("OB or OW", "US or SS") are written as unknown: the value is empty anyway.
    return vr if len(vr) == 2 else "UN"


def _fill_record_keys(
    ds: Dataset,
    *,
    study: Study,
    series: Series,
    instance: Instance,
    study_number: int,
    series_number: int,
    position: int,
) -> None:
    """Give the header copy the values a DICOMDIR record must have (PS3.3 F.5).

    Many objects leave these empty (they are Type 2 in the images but Type 1 in the records);
    like dcmmkdir's --invent, the record gets a stand-in. Only the DICOMDIR sees this copy: the
    object on the media keeps its own bytes.
    """

    def missing(keyword: str) -> bool:
        return keyword not in ds or ds[keyword].VM == 0 or str(ds[keyword].value).strip() == ""

    if missing("PatientID"):
        ds.PatientID = study.patient_id or f"UNKNOWN{study_number}"
    if missing("StudyDate"):
        ds.StudyDate = (study.study_date or timezone.localdate(study.created_at)).strftime("%Y%m%d")
    if missing("StudyTime"):
        ds.StudyTime = study.study_time.strftime("%H%M%S") if study.study_time else "000000"
    if missing("StudyID"):
        ds.StudyID = study.study_id or study.accession_number or str(study_number)
    if missing("StudyInstanceUID"):
        ds.StudyInstanceUID = study.study_instance_uid
    if missing("Modality"):
        ds.Modality = series.modality or "OT"
    if missing("SeriesInstanceUID"):
        ds.SeriesInstanceUID = series.series_instance_uid
    if missing("SeriesNumber"):
        ds.SeriesNumber = (
            series.series_number if series.series_number is not None else series_number
        )
    if missing("InstanceNumber"):
        ds.InstanceNumber = (
            instance.instance_number if instance.instance_number is not None else position
        )


def _record_character_set(ds: Dataset) -> None:
    """Say in the header copy which Specific Character Set its directory records use.

    pydicom copies (0008,0005) of the copy into each record made from it, and a record may
    carry its own (PS3.3 F.5), so records of instances in different character sets can share
    one DICOMDIR. The values from the index are Unicode with no character set at all (in the
    default repertoire pydicom writes them as "?"); those read from a header are decoded here
    with the instance's own set.
    A record whose text is plain ASCII needs none; any other is written in UTF-8 (ISO_IR 192),
    which holds every character of every set losslessly, ISO 2022 code extensions included.
    """
    if "SpecificCharacterSet" in ds:
        ds.decode()  # with the instance's set, before the set changes
    if all(_is_ascii(element) for element in ds.iterall()):
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        return
    ds.SpecificCharacterSet = UTF8


def _is_ascii(element: DataElement) -> bool:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR

    if element.VR not in CUSTOMIZABLE_CHARSET_VR or element.value is None:
        return True
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    return all(str(value).isascii() for value in values)


def _write_dicomdir(fileset: FileSet) -> tuple[bytes, dict[str, str]]:
    """The DICOMDIR bytes and the File ID it gives each SOP Instance UID.

    FileSet writes the (header-only) copies under its own File IDs next to the DICOMDIR; the
    copies are thrown away and the File IDs are read back from the DICOMDIR itself, so that the
    media use exactly the names it references.
    """
    import pydicom

    with tempfile.TemporaryDirectory(prefix="relay-dicomdir-") as tmp:
        fileset.write(tmp)
        dicomdir = (Path(tmp) / "DICOMDIR").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(dicomdir))
    file_ids: dict[str, str] = {}
    for record in ds.DirectoryRecordSequence:
        if "ReferencedFileID" not in record or "ReferencedSOPInstanceUIDInFile" not in record:
            continue
        value = record.ReferencedFileID
        parts = [value] if isinstance(value, str) else list(value)
        file_ids[str(record.ReferencedSOPInstanceUIDInFile)] = "/".join(parts)
    return dicomdir, file_ids


def _plan_reports(
    storage: Storage, studies: list[StudyMedia], reports_of: Callable[[Study], Iterable[Report]]
) -> None:
    number = 0
    for media in studies:
        for report in reports_of(media.study):
            number += 1
            stem = f"REPORT/{_report_stem(number)}"
            if report.is_pdf:
                try:
                    size = storage.size(report.storage_key)
                except Exception as exc:
                    raise ExportError(
                        f"The report {report.uuid} could not be read from storage."
                    ) from exc
                media.reports.append(
                    MediaFile(path=f"{stem}.PDF", size=size, storage_key=report.storage_key)
                )
            else:
                # CRLF so that every Windows text editor shows the lines.
                text = report.text.replace("\r\n", "\n").replace("\n", "\r\n")
                data = text.encode("utf-8")
                media.reports.append(MediaFile(path=f"{stem}.TXT", size=len(data), data=data))


def _report_stem(number: int) -> str:
    return f"REPORT{number:02d}" if number < 100 else f"RPT{number:05d}"


def _readme(studies: list[StudyMedia], *, viewer: bool = True) -> bytes:
    """README.TXT: what the media hold and how to open them, with no more patient data than
    the DICOM files themselves carry (none, in fact: dates and modalities only)."""
    facilities = sorted({m.study.facility.name for m in studies})
    images = sum(len(m.instances) for m in studies)
    lines = [
        "RADIOLOGY IMAGES (DICOM)",
        "",
        f"Sent by: {', '.join(facilities)}, through Relay",
        f"Prepared: {timezone.localdate():%Y-%m-%d}",
        f"Contents: {len(studies)} {'study' if len(studies) == 1 else 'studies'}, "
        f"{images} {'image' if images == 1 else 'images'}",
        "",
    ]
    for number, media in enumerate(studies, start=1):
        study = media.study
        when = f"{study.study_date:%Y-%m-%d}" if study.study_date else "date unknown"
        modalities = "/".join(study.modality_list) or "images"
        series = len({f.path.rsplit("/", 1)[0] for f in media.instances})
        lines.append(
            f"  Study {number}: {when}, {modalities}, {series} series, "
            f"{len(media.instances)} images"
        )
        lines.extend(f"    Report: {report.path}" for report in media.reports)
    lines += [
        "",
        "This is a DICOM medium (DICOM PS3.10, IHE Portable Data for Imaging profile).",
        "DICOMDIR at the top lists every image; the images are in the folders beneath it,",
        "under 8-character names without extensions. Reports, if any, are in REPORT.",
        "",
        "How to open it:",
        *(
            [
                "  - To look at the images: open INDEX.HTM in any web browser (double-click it).",
                "    Its viewer needs no software and no internet; it is not for diagnosis.",
            ]
            if viewer
            else []
        ),
        "  - In a hospital: import the DICOMDIR (or the whole folder) into your PACS.",
        "  - On a computer: open the DICOMDIR with a DICOM viewer (for example Weasis,",
        "    RadiAnt, MicroDicom, Horos or OsiriX). Ordinary photo programs cannot open the",
        "    images.",
        "",
        "These images contain confidential patient information. Keep them safe and do not",
        "pass them on except for the patient's care.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


# --- ZIP ----------------------------------------------------------------------------------------


def _zip(plan: ExportPlan) -> ZipStream:
    # Sized and stored: zipstream-ng then knows the archive's length before the first byte,
    # and DICOM pixel data is either compressed already or not worth the CPU on the way out.
    archive = ZipStream(compress_type=ZIP_STORED, sized=True)
    files = plan.files
    stored = [f for f in files if f.storage_key]
    following = {id(f): stored[i + 1 : i + 1 + PREFETCH] for i, f in enumerate(stored)}
    for media_file in files:
        if media_file.storage_key:
            # A generator: nothing is opened until zipstream reaches this entry.
            chunks = _storage_chunks(media_file, prefetch=following[id(media_file)])
            archive.add(chunks, media_file.path, size=media_file.size)
        elif media_file.produce is not None:
            archive.add(_produced_chunks(media_file), media_file.path, size=media_file.size)
        else:
            archive.add(media_file.data, media_file.path)
    return archive


def zip_stream(plan: ExportPlan) -> Iterator[bytes]:
    """The ZIP, produced as it is read: one stored object open at a time, read in chunks."""
    yield from _zip(plan)


def zip_size(plan: ExportPlan) -> int | None:
    """The exact length `zip_stream` will produce, for Content-Length."""
    try:
        return len(_zip(plan))
    except TypeError:
        return None


def _storage_chunks(
    media_file: MediaFile, *, prefetch: Iterable[MediaFile] = ()
) -> Iterator[bytes]:
    """The stored object's bytes, checked against its SHA-256 and size as they go
    (integrity.IntegrityError). Each chunk is handed on only once the next has been read, so the
    last chunk of a damaged object is never sent and the ZIP it was going into stays broken.

    On a file system storage the disc is asked to read ahead the objects that come next
    (`prefetch`), so that it reads while this one is hashed and sent (`_read_ahead`)."""
    _read_ahead([media_file, *prefetch])
    try:
        reader = verified_open(
            storages["default"],
            media_file.storage_key,
            size=media_file.size,
            sha256=media_file.sha256,
        )
    except FileNotFoundError as exc:
        raise ExportError(f"{media_file.path} is missing from storage.") from exc
    with reader:
        held = b""
        while chunk := reader.read(CHUNK):  # the read that finds the end checks the digest
            if held:
                yield held
            held = chunk
        if held:
            yield held


def _read_ahead(media_files: list[MediaFile]) -> int:
    """Ask the kernel to start reading the stored objects' files into the page cache
    (posix_fadvise WILLNEED, which acts on the file's pages whichever descriptor asks: it
    returns at once, the reading goes on in the background). Only on a storage with local
    paths; returns how many files were advised. The bytes still go through `VerifyingReader`: this only makes the
    disc's work overlap the hashing and sending, which one read at a time would not."""
    storage = storages["default"]
    advised = 0
    if not hasattr(os, "posix_fadvise"):
        return advised  # macOS, Windows
    for media_file in media_files:
        try:
            path = storage.path(media_file.storage_key)
        except NotImplementedError:
            return advised  # an object store: nothing to advise
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # missing: its own read says so
        try:
            os.posix_fadvise(fd, 0, PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
            advised += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return advised


def _produced(media_file: MediaFile) -> bytes:
    assert media_file.produce is not None
    data = media_file.produce()
    if len(data) != media_file.size:
        raise ExportError(
            f"{media_file.path} came out at {len(data)} bytes, not {media_file.size}."
        )
    return data


def _produced_chunks(media_file: MediaFile) -> Iterator[bytes]:
    # A generator too: the frame is made only when zipstream reaches it.
    yield _produced(media_file)


# --- ISO 9660 -----------------------------------------------------------------------------------


class _StorageReader(io.RawIOBase):
    """A stored object as a file for pycdlib, opened only when pycdlib starts copying it and
    closed when the last byte is read, so that a study of thousands of images never holds
    thousands of open files (or S3 connections)."""

    def __init__(self, media_file: MediaFile) -> None:
        super().__init__()
        self._file = media_file
        self._fh: VerifyingReader | None = None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self._file.size
        if offset != self._pos:
            self._release()
            self._pos = offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._file.size - self._pos)
        if want <= 0:
            self._release()
            return 0
        if self._fh is None:
            self._fh = verified_open(
                storages["default"],
                self._file.storage_key,
                size=self._file.size,
                sha256=self._file.sha256,
            )
            if self._pos:
                self._fh.seek(self._pos)
        view = memoryview(buffer)
        got = 0
        # pycdlib takes a short read for the end of the file, so fill the buffer completely.
        while got < want:
            chunk = self._fh.read(want - got)
            if not chunk:
                raise ExportError(f"{self._file.path} ended early in storage.")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        self._pos += got
        if self._pos >= self._file.size:
            # The last byte of it is read: the whole object is checked (what a seek skipped is
            # read again) before the image can be finished (integrity.IntegrityError).
            self._fh.verify()
            self._release()
        return got

    def _release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        self._release()
        super().close()


class _ProducedReader(io.RawIOBase):
    """A made file (a disc viewer frame) for pycdlib: made when pycdlib first reads it and let
    go once its last byte is read, so one frame at a time is in memory."""

    def __init__(self, media_file: MediaFile) -> None:
        super().__init__()
        self._file = media_file
        self._data: bytes | None = None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self._file.size
        self._pos = offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._file.size - self._pos)
        if want <= 0:
            self._data = None
            return 0
        if self._data is None:
            self._data = _produced(self._file)
        memoryview(buffer)[:want] = self._data[self._pos : self._pos + want]
        self._pos += want
        if self._pos >= self._file.size:
            self._data = None
        return want

    def close(self) -> None:
        self._data = None
        super().close()


def _iso_name(path: str) -> str:
    # ISO 9660 wants a dot and a version; readers show "DICOMDIR." as "DICOMDIR".
    name = path if "." in path.rsplit("/", 1)[-1] else f"{path}."
    return f"/{name};1"


def _iso(plan: ExportPlan) -> tuple[pycdlib.PyCdlib, list[io.IOBase]]:
    import pycdlib

    volume_label = plan.file_set_id
    if not VOLUME_LABEL_RE.match(volume_label):
        raise ExportError("A volume label is 1 to 16 of A-Z, 0-9 and _.")
    iso = pycdlib.PyCdlib()
    # Level 1 (8.3 names of d-characters) is what every PDI reader handles; Joliet level 3
    # gives the same names to systems that show Joliet. The volume identifier is the
    # DICOMDIR's File-set ID (PS3.12 F.1.1); pycdlib pads it with spaces, in both descriptors.
    iso.new(interchange_level=1, vol_ident=volume_label, app_ident_str="RELAY", joliet=3)
    sources: list[io.IOBase] = []
    directories: set[str] = set()
    for media_file in plan.files:
        parts = media_file.path.split("/")
        if not all(MEDIA_NAME_RE.match(part) for part in parts):
            raise ExportError(f"{media_file.path} is not a valid media file name.")
        for depth in range(1, len(parts)):
            directory = "/" + "/".join(parts[:depth])
            if directory not in directories:
                iso.add_directory(iso_path=directory, joliet_path=directory)
                directories.add(directory)
        source: io.IOBase
        if media_file.storage_key:
            source = _StorageReader(media_file)
        elif media_file.produce is not None:
            source = _ProducedReader(media_file)
        else:
            source = io.BytesIO(media_file.data)
        sources.append(source)
        iso.add_fp(
            cast(BinaryIO, source),
            media_file.size,
            iso_path=_iso_name(media_file.path),
            joliet_path="/" + media_file.path,
        )
    return iso, sources


def iso_size(plan: ExportPlan) -> int:
    """The exact size of the ISO image `iso_build` writes; give it to `media_kind_for` to choose
    the disc."""
    iso, sources = _iso(plan)
    try:
        iso.force_consistency()
        return int(iso.pvd.space_size) * SECTOR
    finally:
        iso.close()
        for source in sources:
            source.close()


def iso_build(
    plan: ExportPlan,
    *,
    out: BinaryIO,
    volume_label: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write an ISO 9660 + Joliet image holding the same files as the ZIP.

    The volume label is the plan's File-set ID (`volume_label_for`); another one is refused,
    since PS3.12 F.1.1 wants the two equal. `out` must be seekable (pycdlib writes the
    directory records before the data). `progress` gets (bytes written, bytes of the whole
    image) as the image grows.
    """
    if volume_label is not None and volume_label != plan.file_set_id:
        raise ExportError("The volume label of a DICOM disc is its DICOMDIR's File-set ID.")
    iso, sources = _iso(plan)
    try:
        iso.force_consistency()
        media_kind_for(int(iso.pvd.space_size) * SECTOR)

        # pycdlib counts the callback's arguments to decide how to call it; three is the form
        # its type hints allow.
        def report(done: int, total: int, opaque: Any) -> None:
            if progress is not None:
                progress(done, total)

        iso.write_fp(out, blocksize=CHUNK, progress_cb=report)
    finally:
        iso.close()
        for source in sources:
            source.close()


# --- labels and media ---------------------------------------------------------------------------


def file_set_id_for(studies: list[Study]) -> str:
    """The File-set ID of the media, which is also the disc's volume label: RELAY_ and ten
    hexadecimal digits of a SHA-256 of the studies' Relay UUIDs, e.g. RELAY_3F9A0C12BE.

    Every operating system that mounts a disc shows its label, and people write it on the
    disc, so it names no patient and no date (the file names do not either). It is the same for
    every download of the same studies, so support can match a disc to them; the UUIDs are
    hashed so that the label does not give away part of a study's URL."""
    digest = hashlib.sha256("|".join(sorted(str(s.uuid) for s in studies)).encode())
    return f"{FILE_SET_PREFIX}{digest.hexdigest()[:FILE_SET_ID_DIGITS].upper()}"


def volume_label_for(studies: list[Study]) -> str:
    """The disc label: the media's File-set ID (PS3.12 F.1.1), free of patient data."""
    return file_set_id_for(studies)


def media_kind_for(total_bytes: int) -> str:
    """The disc the image fits on: "CD" or "DVD"; too big for one DVD is an ExportError."""
    if total_bytes <= CD_BYTES:
        return "CD"
    if total_bytes <= DVD_BYTES:
        return "DVD"
    raise ExportError(
        f"The studies take {total_bytes / 1e9:.1f} GB, more than one DVD holds "
        f"({DVD_BYTES / 1e9:.1f} GB); download them as a ZIP instead."
    )
