"""De-identified copies of studies, made for one share (PS3.15 Basic Profile, `profile`).

The share form calls, in one transaction:
1. `burned_in_series(studies=...)`: the series whose pixels may carry the patient's name (the
   sender must confirm them);
2. `deidentified_copies_prepare(...)`: an empty copy Study per original (new Study Instance
   UID, the pseudonym as patient) with its mapping row, status receiving;
3. `share_create(studies=copies)` (transfers.sharing), so the share names only the copies;
4. `deidentified_copies_attach(share=..., copies=...)`: the copies belong to the share, and
   their making is queued once the transaction commits.

The task (`tasks.deidentified_copy_make`) reads every instance of the original, de-identifies
it (`apply.dataset_deidentify`) and stores it through `transfers.ingest` like any upload
(validated, hashed, indexed into the copy), then completes the copy with a manifest of what it
stored, so the share's recipients are told (and the viewer's renders made) as for any study.
"""

from __future__ import annotations

import io
import logging
import secrets
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import TYPE_CHECKING

from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, User

from ..completion import manifest_apply
from ..integrity import instance_open
from ..models import CopyStatus, DeidentifiedCopy, Instance, Series, Share, Study, StudyStatus
from ..queue import task_queue_on_commit

if TYPE_CHECKING:
    import pydicom

# pydicom, the ingest and the de-identification itself (dicom-anonymizer's tables) are imported
# where a copy is made or a header read: the sharing page's view imports this module, and a web
# worker serving pages loads no pixel code (tests/relay/test_lean_imports.py).

log = logging.getLogger(__name__)

OPTIONS = ("retain_dates", "clean_descriptors", "retain_device")
# Dates move back by a whole number of days between these (one to ten years): far enough that a
# date cannot be matched to the original visit, the same for every study of the share.
OFFSET_MIN_DAYS, OFFSET_MAX_DAYS = 365, 3650

# Burned-in annotation: pixels that may show the patient's name, ID or dates. Pixel data is
# copied as it is (Relay does no OCR or redaction), so these series are named to the sender,
# who confirms them. Sources: the Burned In Annotation attribute (0028,0301), PS3.3 C.7.6.1.1.3;
# PS3.15 E.1.1 and the Clean Pixel Data Option (E.3.1) on secondary captures, ultrasound and
# other images whose text is part of the pixels; the modalities of the table below are those the
# option and common practice name (ultrasound, angiography and fluoroscopy screens, endoscopy,
# secondary capture and screenshots, scanned documents).
BURNED_IN_MODALITIES = {
    "US": "ultrasound images usually show the patient's name and ID on screen",
    "XA": "angiography screens often carry text in the pixels",
    "RF": "fluoroscopy screens often carry text in the pixels",
    "ES": "endoscopy images often carry text in the pixels",
    "SC": "secondary captures are screenshots",
    "OT": "'other' images are often screenshots or scans",
    "DOC": "scanned documents",
    "XC": "photographs may show a face or a wristband",
}
BURNED_IN_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL Endoscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic Image",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}


class DeidentifyError(Exception):
    """Why a de-identified copy cannot be made; shown to the sender."""


@dataclass(frozen=True)
class BurnedIn:
    """A series whose pixels may carry identifying text, and why."""

    study_uuid: str
    series_uid: str
    label: str
    why: str

    def as_dict(self) -> dict[str, str]:
        return {"series_uid": self.series_uid, "label": self.label, "why": self.why}


def _says_burned_in(instance: Instance) -> bool:
    """Whether the stored header says Burned In Annotation YES (read up to the pixels)."""
    import pydicom

    try:
        with instance_open(instance, at_end=False) as reader:
            ds = pydicom.dcmread(reader, stop_before_pixels=True, force=True)
    except Exception:
        log.warning("could not read the header of instance %s", instance.pk)
        return True  # unknown: warned about rather than passed over
    return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"


def burned_in_series(*, studies: list[Study]) -> list[BurnedIn]:
    """The series of these studies that may show identifying text in their pixels: by modality,
    by SOP class, or because their first instance says Burned In Annotation YES."""
    found: list[BurnedIn] = []
    for study in studies:
        for series in Series.objects.filter(study=study).order_by("series_number", "pk"):
            label = f"{series.modality or '?'} series {series.series_number or ''} {series.description}".strip()
            why = BURNED_IN_MODALITIES.get(series.modality.upper())
            classes = set(
                Instance.objects.filter(series=series).values_list("sop_class_uid", flat=True)
            )
            named = sorted(BURNED_IN_SOP_CLASSES[c] for c in classes if c in BURNED_IN_SOP_CLASSES)
            if why is None and named:
                why = f"{named[0]} objects often carry text in the pixels"
            if why is None:
                first = Instance.objects.filter(series=series).first()
                if first is not None and _says_burned_in(first):
                    why = "its images say Burned In Annotation: YES"
            if why is not None:
                found.append(BurnedIn(str(study.uuid), series.series_instance_uid, label, why))
    return found


def _pseudonym(rng_code: str) -> tuple[str, str]:
    return f"ANON^{rng_code}", f"ANON-{rng_code}"


@transaction.atomic
def deidentified_copies_prepare(
    *,
    studies: list[Study],
    by: User,
    options: frozenset[str] = frozenset(),
    burned_in_confirmed: list[BurnedIn] | None = None,
    request: HttpRequest | None = None,
) -> list[Study]:
    """An empty copy per original study, each with its mapping; returns the copies (receiving).

    One patient (by Patient ID) gets one pseudonym across the studies of this share, and all of
    them one date offset and one UID key, so that the copies still relate to each other."""
    from .apply import CopyKeys

    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise DeidentifyError(f"Unknown de-identification option: {sorted(unknown)}")
    if not studies:
        raise DeidentifyError("Choose at least one study.")
    if any(hasattr(s, "deidentified_copy") for s in studies):
        raise DeidentifyError("A de-identified copy cannot be copied again; share the original.")
    if any(s.purged_at is not None or s.reconcile_running for s in studies):
        raise DeidentifyError("A purged study, or one being reconciled, cannot be copied.")
    key = secrets.token_hex(32)
    offset = -(OFFSET_MIN_DAYS + secrets.randbelow(OFFSET_MAX_DAYS - OFFSET_MIN_DAYS + 1))
    confirmed = burned_in_confirmed or []
    pseudonyms: dict[str, str] = {}
    copies: list[Study] = []
    keys = CopyKeys(key=bytes.fromhex(key), date_offset_days=offset, patient_name="", patient_id="")
    for study in studies:
        code = pseudonyms.setdefault(
            study.patient_id or f"study-{study.pk}", secrets.token_hex(4).upper()
        )
        name, patient_id = _pseudonym(code)
        copy = Study.objects.create(
            facility=study.facility,
            uploaded_by=by,
            study_instance_uid=keys.uid(study.study_instance_uid),
            patient_name=name,
            patient_id=patient_id,
            # Date, time and description follow from the first de-identified instance.
            status=StudyStatus.RECEIVING,
        )
        DeidentifiedCopy.objects.create(
            study=copy,
            original=study,
            facility=study.facility,
            created_by=by,
            retain_dates="retain_dates" in options,
            clean_descriptors="clean_descriptors" in options,
            retain_device="retain_device" in options,
            date_offset_days=offset if "retain_dates" in options else 0,
            uid_key=key,
            patient_name=name,
            patient_id=patient_id,
            uid_map={study.study_instance_uid: copy.study_instance_uid},
            burned_in_series=[b.as_dict() for b in confirmed if b.study_uuid == str(study.uuid)],
        )
        # Reading the original to make the copy is an access to the patient's data: audited.
        audit_record(
            action=AuditAction.DEIDENTIFY,
            request=request,
            actor=by,
            study=study,
            detail={
                "deidentified_copy": str(copy.uuid),
                "options": sorted(options),
                "burned_in_confirmed": [b.series_uid for b in confirmed],
            },
        )
        copies.append(copy)
    return copies


def deidentified_copies_attach(*, share: Share, copies: list[Study]) -> None:
    """The copies belong to `share` (and lapse with it); their making starts once it commits."""
    for mapping in DeidentifiedCopy.objects.filter(study__in=copies):
        mapping.share = share
        mapping.save(update_fields=["share"])
        task_queue_on_commit("transfers.deidentify.tasks.deidentified_copy_make", mapping.pk)


def deidentified_copy_make(*, mapping_id: int) -> str:
    """Fill the copy: every instance of the original, de-identified, stored through ingest;
    then complete it. Safe to run twice: instances already in the copy are duplicates."""
    import pydicom

    from ..ingest import DUPLICATE, STORED, instance_ingest
    from .apply import CopyKeys, dataset_deidentify, identifiers_of

    mapping = (
        DeidentifiedCopy.objects.select_related("study", "original", "facility", "created_by")
        .filter(pk=mapping_id)
        .first()
    )
    if mapping is None or mapping.status == CopyStatus.DONE:
        return "nothing to do"
    if mapping.study.purged_at is not None:
        return "the copy was purged (its share lapsed)"
    keys = CopyKeys(
        key=bytes.fromhex(mapping.uid_key),
        date_offset_days=mapping.date_offset_days,
        patient_name=mapping.patient_name,
        patient_id=mapping.patient_id,
        options=mapping.options,
        uid_map=dict(mapping.uid_map),
    )
    confirmed = {entry["series_uid"] for entry in mapping.burned_in_series}
    entries: list[dict[str, str]] = []
    withheld = 0
    first: pydicom.Dataset | None = None
    instances = Instance.objects.filter(series__study=mapping.original).select_related("series")
    try:
        for instance in instances.iterator():
            with instance_open(instance) as reader:
                raw = reader.read()
                reader.verify()
            ds = pydicom.dcmread(io.BytesIO(raw), force=True)
            burned = str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
            if burned and instance.series.series_instance_uid not in confirmed:
                withheld += 1
                continue
            keys.identifiers = identifiers_of(ds)
            dataset_deidentify(ds, keys)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            result = instance_ingest(
                facility=mapping.facility,
                user=mapping.created_by,
                chunks=[out.getvalue()],
                source="deidentify",
                only_study=mapping.study.study_instance_uid,
            )
            if result.status not in (STORED, DUPLICATE):
                raise DeidentifyError(f"a de-identified instance was not stored: {result.reason}")
            entries.append({"sop_instance_uid": result.sop_instance_uid, "sha256": result.sha256})
            if first is None:
                first = ds
    except Exception as exc:
        DeidentifiedCopy.objects.filter(pk=mapping.pk).update(
            status=CopyStatus.FAILED, error=str(exc)[:300], uid_map=keys.uid_map
        )
        raise
    with transaction.atomic():
        DeidentifiedCopy.objects.filter(pk=mapping.pk).update(
            status=CopyStatus.DONE,
            finished_at=timezone.now(),
            uid_map=keys.uid_map,
            withheld=withheld,
        )
        if first is not None:
            Study.objects.filter(pk=mapping.study_id).update(**_study_row(first))
        if entries:
            manifest_apply(facility=mapping.facility, entries=entries)
    return f"{len(entries)} instances copied, {withheld} withheld"


def copies_of_share(share: Share) -> list[DeidentifiedCopy]:
    """The share's de-identified copies with their originals: for its sender's eyes only."""
    return list(DeidentifiedCopy.objects.filter(share=share).select_related("original", "study"))


def _study_row(ds: pydicom.Dataset) -> dict[str, object]:
    """The copy's Study row as its de-identified data set has it (the index the worklist of a
    recipient and the share's page show)."""

    def text(keyword: str, length: int) -> str:
        return str(ds.get(keyword, "") or "").replace("\x00", "").strip()[:length]

    def day(value: str) -> date | None:
        try:
            return datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None  # noqa: DTZ007
        except ValueError:
            return None

    def moment(value: str) -> time | None:
        digits = value.split(".")[0]
        if not digits.isdigit() or len(digits) not in (2, 4, 6):
            return None
        digits = digits.ljust(6, "0")
        try:
            return time(int(digits[:2]), int(digits[2:4]), int(digits[4:6]))
        except ValueError:
            return None

    return {
        "study_date": day(text("StudyDate", 8)),
        "study_time": moment(text("StudyTime", 16)),
        "description": text("StudyDescription", 64),
        "referring_physician": text("ReferringPhysicianName", 324),
        "accession_number": text("AccessionNumber", 16),
        "study_id": text("StudyID", 16),
        "patient_sex": text("PatientSex", 16),
    }
