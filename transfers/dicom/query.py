"""C-FIND on the gateway: a PACS asks Relay's index what the calling facility may see.

Study Root (levels STUDY, SERIES, IMAGE) and Patient Root (PATIENT too) query models, answered
from the index (Study, Series, Instance), never from the files. What a facility sees (`visible_studies`):
its own studies, and the studies of active shares it received with the import right, as long
as their images are kept (not purged). The same study held twice (its own copy and one shared
with it) is answered once, its own copy first.

Matching follows PS3.4 C.2.2.2: universal matching (an empty key), single value matching
(person names without regard to case), wildcards `*` and `?`, date and time ranges
(`20240101-20241231`, `20240101-`, `-20241231`), and lists of values (`uid1\\uid2`: any of
them). A key that does not belong to the level asked is not matched on (Orthanc sends
PatientID and AccessionNumber with its series queries); it is answered when Relay knows its
value, empty otherwise, like any key it does not hold. Each answer carries the keys asked for,
QueryRetrieveLevel, RetrieveAETitle (the facility's AE title, the one to C-MOVE or C-GET from)
and, when a value is not ASCII, SpecificCharacterSet ISO_IR 192 (UTF-8).

Every query is audited (DICOM_QUERY): the model, the level, which keys carried a value (their
names, never the values) and how many answers went out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, time
from typing import Any

from django.db.models import Case, IntegerField, Q, QuerySet, Value, When
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from portal.audit import audit_record
from portal.models import AuditAction, Facility, Outcome

from ..models import ORIGINALS, Instance, Series, Share, Study
from .caller import Caller

log = logging.getLogger(__name__)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
QUERY_RETRIEVE_CLASSES = (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_MOVE,
    PATIENT_ROOT_GET,
    STUDY_ROOT_GET,
)
PATIENT_ROOT = {PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET}

PENDING = 0xFF00
CANCEL = 0xFE00
SUCCESS = 0x0000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC000

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UTF8 = "ISO_IR 192"


class QueryError(ValueError):
    """The identifier cannot be answered (0xA900 "identifier does not match SOP class")."""


@dataclass(frozen=True)
class Key:
    """One query key Relay holds: the level it belongs to, where its value is in the index
    (the field of the level's row; None for computed ones, which are answered, not matched),
    and how it is matched."""

    level: str
    field: str | None
    kind: str  # "text", "name", "uid", "date", "time", "int", "modalities", "count"


KEYS: dict[str, Key] = {
    "PatientName": Key("PATIENT", "patient_name", "name"),
    "PatientID": Key("PATIENT", "patient_id", "text"),
    "IssuerOfPatientID": Key("PATIENT", "issuer_of_patient_id", "text"),
    "PatientBirthDate": Key("PATIENT", "patient_birth_date", "date"),
    "PatientSex": Key("PATIENT", "patient_sex", "text"),
    "NumberOfPatientRelatedStudies": Key("PATIENT", None, "count"),
    "NumberOfPatientRelatedSeries": Key("PATIENT", None, "count"),
    "NumberOfPatientRelatedInstances": Key("PATIENT", None, "count"),
    "StudyInstanceUID": Key("STUDY", "study_instance_uid", "uid"),
    "StudyDate": Key("STUDY", "study_date", "date"),
    "StudyTime": Key("STUDY", "study_time", "time"),
    "AccessionNumber": Key("STUDY", "accession_number", "text"),
    "StudyID": Key("STUDY", "study_id", "text"),
    "StudyDescription": Key("STUDY", "description", "text"),
    "ReferringPhysicianName": Key("STUDY", "referring_physician", "name"),
    "ModalitiesInStudy": Key("STUDY", "modalities", "modalities"),
    "NumberOfStudyRelatedSeries": Key("STUDY", None, "count"),
    "NumberOfStudyRelatedInstances": Key("STUDY", None, "count"),
    "SeriesInstanceUID": Key("SERIES", "series_instance_uid", "uid"),
    "Modality": Key("SERIES", "modality", "text"),
    "SeriesNumber": Key("SERIES", "series_number", "int"),
    "SeriesDescription": Key("SERIES", "description", "text"),
    "BodyPartExamined": Key("SERIES", "body_part", "text"),
    "NumberOfSeriesRelatedInstances": Key("SERIES", None, "count"),
    "SOPInstanceUID": Key("IMAGE", "sop_instance_uid", "uid"),
    "SOPClassUID": Key("IMAGE", "sop_class_uid", "uid"),
    "InstanceNumber": Key("IMAGE", "instance_number", "int"),
    "Rows": Key("IMAGE", "rows", "int"),
    "Columns": Key("IMAGE", "columns", "int"),
    "NumberOfFrames": Key("IMAGE", "number_of_frames", "int"),
}
# The path from each level's row to the study's row, and the field prefix of each level's
# own fields seen from a row of a lower level.
PREFIX = {
    ("STUDY", "PATIENT"): "",
    ("STUDY", "STUDY"): "",
    ("SERIES", "PATIENT"): "study__",
    ("SERIES", "STUDY"): "study__",
    ("SERIES", "SERIES"): "",
    ("IMAGE", "PATIENT"): "series__study__",
    ("IMAGE", "STUDY"): "series__study__",
    ("IMAGE", "SERIES"): "series__",
    ("IMAGE", "IMAGE"): "",
}
# Keys without a place in the index that are answered anyway (their tag, empty).
NOT_ANSWERED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}


def visible_studies(facility: Facility) -> QuerySet[Study]:
    """The studies a facility's PACS may query and retrieve: its own, and those of the active
    shares it received with the import right; images kept (not purged)."""
    shared = Share.objects.active().filter(recipient_facility=facility, can_import=True)
    return Study.objects.filter(
        (Q(facility=facility) & ORIGINALS) | Q(pk__in=shared.values("studies")),
        purged_at__isnull=True,
    )


def import_share(facility: Facility, study: Study) -> Share | None:
    """The active share with the import right through which `facility` holds another
    facility's study (None for its own study)."""
    if study.facility_id == facility.pk:
        return None
    return (
        Share.objects.active()
        .filter(recipient_facility=facility, can_import=True, studies=study)
        .order_by("-created_at")
        .first()
    )


def query_level(identifier: Dataset, model: str) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"unknown query level {level!r}")
    if level == "PATIENT" and model not in PATIENT_ROOT:
        raise QueryError("the PATIENT level belongs to the Patient Root model")
    return level


def _matched_keys(level: str, model: str) -> set[str]:
    """Which keys are matched at `level`: the level's own keys (the patient's too at STUDY
    level of Study Root, where they are study attributes) and the unique keys of the levels
    above."""
    own = {name for name, key in KEYS.items() if key.level == level}
    if level == "STUDY" and model not in PATIENT_ROOT:
        own |= {name for name, key in KEYS.items() if key.level == "PATIENT"}
    upper = {
        "PATIENT": set(),
        "STUDY": {"PatientID"} if model in PATIENT_ROOT else set(),
        "SERIES": {"StudyInstanceUID"} | ({"PatientID"} if model in PATIENT_ROOT else set()),
        "IMAGE": {"StudyInstanceUID", "SeriesInstanceUID"}
        | ({"PatientID"} if model in PATIENT_ROOT else set()),
    }[level]
    return own | upper


def _values(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, MultiValue | list | tuple):
        return [str(v).strip() for v in raw if str(v).strip()]
    text = str(raw).strip()
    return [text] if text else []


def _wildcard_regex(value: str) -> str:
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    return f"^{pattern}$"


def _parse_date(text: str) -> date:
    text = text.replace(".", "")
    if not re.fullmatch(r"\d{8}", text):
        raise QueryError("a date is YYYYMMDD")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as exc:
        raise QueryError("not a date") from exc


def _parse_time(text: str, *, end: bool = False) -> time:
    text = text.replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text)
    if not match:
        raise QueryError("a time is HHMMSS")
    hour, minute, second, fraction = match.groups()
    top = 59 if end else 0
    try:
        return time(
            int(hour),
            int(minute) if minute else top,
            int(second) if second else top,
            int(fraction.ljust(6, "0")) if fraction else (999999 if end else 0),
        )
    except ValueError as exc:
        raise QueryError("not a time") from exc


def _one_match(field: str, kind: str, value: str) -> Q:
    """The condition for one value of a key (C.2.2.2.1 to C.2.2.2.5)."""
    if kind in ("date", "time") and "-" in value:
        start, _, end = value.partition("-")
        parse: Callable[..., Any] = _parse_date if kind == "date" else _parse_time
        condition = Q()
        if start:
            condition &= Q(**{f"{field}__gte": parse(start)})
        if end:
            condition &= Q(
                **{f"{field}__lte": parse(end, end=True) if kind == "time" else parse(end)}
            )
        return condition
    if kind == "date":
        return Q(**{field: _parse_date(value)})
    if kind == "time":
        return Q(
            **{f"{field}__gte": _parse_time(value), f"{field}__lte": _parse_time(value, end=True)}
        )
    if kind == "int":
        try:
            return Q(**{field: int(value)})
        except ValueError as exc:
            raise QueryError("not a number") from exc
    if kind == "modalities":
        return Q(**{f"{field}__regex": rf"(^|,){re.escape(value)}(,|$)"})
    wild = "*" in value or "?" in value
    if kind == "name":
        if value.strip("*") == "":
            return Q()
        return Q(
            **{f"{field}__iregex": _wildcard_regex(value)} if wild else {f"{field}__iexact": value}
        )
    if wild and kind != "uid":
        if value.strip("*") == "":
            return Q()
        return Q(**{f"{field}__regex": _wildcard_regex(value)})
    return Q(**{field: value})


def _conditions(identifier: Dataset, level: str, model: str) -> tuple[Q, list[str]]:
    """The index conditions for the keys matched at `level`, and the names of those used."""
    matched = _matched_keys(level, model)
    condition = Q()
    used = []
    for elem in identifier:
        name = elem.keyword
        key = KEYS.get(name)
        if key is None or key.field is None or name not in matched:
            continue
        values = _values(elem.value)
        if not values:
            continue  # universal matching
        row_level = "STUDY" if key.level == "PATIENT" else key.level
        query_row = "STUDY" if level == "PATIENT" else level
        field = PREFIX[(query_row, row_level)] + key.field
        any_of = Q()
        for value in values:
            any_of |= _one_match(field, key.kind, value)
        condition &= any_of
        used.append(name)
    return condition, sorted(used)


def _text(value: Any, kind: str) -> Any:
    if value is None:
        return ""
    if kind == "date" and isinstance(value, date):
        return value.strftime("%Y%m%d")
    if kind == "time" and isinstance(value, time):
        text = value.strftime("%H%M%S")
        return f"{text}.{value.microsecond:06d}" if value.microsecond else text
    if kind in ("int", "count"):
        return str(int(value))
    if kind == "modalities":
        return [m for m in str(value).split(",") if m]
    return str(value)


def _study_values(study: Study) -> dict[str, Any]:
    values: dict[str, Any] = {
        name: getattr(study, key.field)
        for name, key in KEYS.items()
        if key.level in ("PATIENT", "STUDY") and key.field
    }
    values["NumberOfStudyRelatedSeries"] = study.num_series
    values["NumberOfStudyRelatedInstances"] = study.num_instances
    return values


def _series_values(series: Series) -> dict[str, Any]:
    values = _study_values(series.study)
    values.update(
        {
            name: getattr(series, key.field)
            for name, key in KEYS.items()
            if key.level == "SERIES" and key.field
        }
    )
    values["NumberOfSeriesRelatedInstances"] = series.num_instances
    return values


def _instance_values(instance: Instance) -> dict[str, Any]:
    values = _series_values(instance.series)
    values.update(
        {
            name: getattr(instance, key.field)
            for name, key in KEYS.items()
            if key.level == "IMAGE" and key.field
        }
    )
    return values


def _own_first(queryset: QuerySet[Any], facility: Facility, facility_field: str) -> QuerySet[Any]:
    return queryset.annotate(
        relay_own=Case(
            When(**{facility_field: facility.pk}, then=Value(0)),
            default=Value(1),
            output_field=IntegerField(),
        )
    ).order_by("relay_own", "pk")


def _rows(facility: Facility, level: str, condition: Q) -> Iterator[dict[str, Any]]:
    """The values of each matching entity at `level`, each entity once."""
    visible = visible_studies(facility)
    seen: set[Any] = set()
    if level == "PATIENT":
        patients: dict[tuple[str, str], dict[str, Any]] = {}
        for study in visible.filter(condition).order_by("pk").iterator():
            key = (study.patient_id, study.issuer_of_patient_id)
            if study.study_instance_uid in seen:
                continue
            seen.add(study.study_instance_uid)
            entry = patients.get(key)
            if entry is None:
                entry = patients[key] = _study_values(study)
                entry["NumberOfPatientRelatedStudies"] = 0
                entry["NumberOfPatientRelatedSeries"] = 0
                entry["NumberOfPatientRelatedInstances"] = 0
            entry["NumberOfPatientRelatedStudies"] += 1
            entry["NumberOfPatientRelatedSeries"] += study.num_series
            entry["NumberOfPatientRelatedInstances"] += study.num_instances
        yield from patients.values()
        return
    rows: Iterable[Any]
    if level == "STUDY":
        rows = _own_first(visible.filter(condition), facility, "facility_id")
        for study in rows.iterator():
            if study.study_instance_uid not in seen:
                seen.add(study.study_instance_uid)
                yield _study_values(study)
    elif level == "SERIES":
        rows = _own_first(
            Series.objects.filter(study__in=visible).filter(condition).select_related("study"),
            facility,
            "study__facility_id",
        )
        for series in rows.iterator():
            if series.series_instance_uid not in seen:
                seen.add(series.series_instance_uid)
                yield _series_values(series)
    else:
        rows = _own_first(
            Instance.objects.filter(series__study__in=visible)
            .filter(condition)
            .select_related("series__study"),
            facility,
            "facility_id",
        )
        for instance in rows.iterator():
            if instance.sop_instance_uid not in seen:
                seen.add(instance.sop_instance_uid)
                yield _instance_values(instance)


def _answer(identifier: Dataset, level: str, values: dict[str, Any], facility: Facility) -> Dataset:
    """The requested keys with this entity's values (empty where Relay holds none)."""
    answer = Dataset()
    for elem in identifier:
        name = elem.keyword
        if not name or elem.tag.is_private or name in NOT_ANSWERED:
            continue
        if elem.VR == "SQ":
            answer.add(DataElement(elem.tag, "SQ", []))
            continue
        key = KEYS.get(name)
        value = _text(values.get(name), key.kind) if key is not None else ""
        if name == "InstanceAvailability":
            value = "ONLINE"  # every answer is kept (purged studies are not answered)
        vr = elem.VR if elem.VR not in ("UN", None) else dictionary_VR(elem.tag)
        answer.add(DataElement(elem.tag, vr, value))
    answer.QueryRetrieveLevel = level
    answer.RetrieveAETitle = facility.ae_title
    if not all(_ascii(elem.value) for elem in answer):
        answer.SpecificCharacterSet = UTF8
    return answer


def _ascii(value: Any) -> bool:
    if isinstance(value, list | MultiValue):
        return all(_ascii(v) for v in value)
    return str(value).isascii()


def find_answers(caller: Caller, event: Any) -> Iterator[tuple[int, Dataset | None]]:
    """The EVT_C_FIND handler's generator: one pending answer per match, then success."""
    model = str(event.context.abstract_syntax)
    count = 0
    level = ""
    used: list[str] = []
    outcome = "success"
    try:
        identifier = event.identifier
        level = query_level(identifier, model)
        condition, used = _conditions(identifier, level, model)
        for values in _rows(caller.facility, level, condition):
            if event.is_cancelled:
                outcome = "cancelled"
                yield CANCEL, None
                return
            count += 1
            yield PENDING, _answer(identifier, level, values, caller.facility)
    except QueryError as exc:
        outcome = f"refused: {exc}"
        yield IDENTIFIER_DOES_NOT_MATCH, None
        return
    except Exception:
        log.exception("gateway: C-FIND from %s failed", caller.source)
        outcome = "failed"
        yield OUT_OF_RESOURCES, None
        return
    finally:
        _audit(caller, model=model, level=level, keys=used, count=count, outcome=outcome)
    yield SUCCESS, None


def _audit(
    caller: Caller, *, model: str, level: str, keys: list[str], count: int, outcome: str
) -> None:
    try:
        audit_record(
            action=AuditAction.DICOM_QUERY,
            facility=caller.facility,
            outcome=Outcome.SUCCESS if outcome in ("success", "cancelled") else Outcome.FAILURE,
            address=caller.address,
            detail={
                "calling_ae": caller.calling_ae,
                "source": caller.source,
                "model": "patient" if model in PATIENT_ROOT else "study",
                "level": level,
                "keys": keys,
                "matches": count,
                "result": outcome[:100],
            },
        )
    except Exception:
        log.exception("gateway: could not audit a C-FIND from %s", caller.source)
