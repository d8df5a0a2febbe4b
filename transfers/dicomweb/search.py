"""QIDO-RS (PS3.18 §10.6): searching studies, series and instances from Relay's index.

Every answer comes from the database rows ingest wrote (Study, Series, Instance), never from
the stored files, in one SQL statement whatever the number of results: the visible studies are
a subquery, each level's attributes are columns of its row or of its parents' rows.

Matching follows PS3.4 §C.2.2.2: a single value matches exactly (a person name regardless of
case); `*` and `?` are wildcards in text (`**` is `*`); UIDs may be a list (`a\\b`); dates and
times may be ranges (`A-B`, `A-`, `-B`); ModalitiesInStudy matches a study with any series of
the modality (or of any in a list). An empty value or `*` matches everything. Keys are keywords
or tags (`PatientID` or `00100020`); a key Relay does not index is ignored and named in a
Warning header. A value that cannot be a date, a time, a UID or a number is a 400 that says so.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.db.models import F, Model, Q, QuerySet

from ..models import Instance, Series, Study
from ..uids import is_valid_uid

# The most results one answer holds; `limit` above it is lowered to it (and a Warning says more
# can be asked for, with offset).
MAX_RESULTS = 1000
MAX_OFFSET = 10_000_000
MAX_LIST = 100  # values in a UID or modality list
SPECIFIC_CHARACTER_SET = "00080005"
RETRIEVE_URL = "00081190"
WARN_MORE = "There are additional results that can be requested"
WARN_FUZZY = (
    "The fuzzymatching parameter is not supported. Only literal matching has been performed."
)


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class QueryError(ValueError):
    """A search that cannot be answered as asked (400, with this text as the reason)."""


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: str
    vr: str
    level: Level  # the level whose row holds it
    field: str  # the column, relative to that row
    required: bool = False  # returned at its own level even when not asked for


# What Relay indexes, and so what can be matched and returned (PS3.18 Tables 10.6.3-3/4/5).
ATTRIBUTES = (
    Attribute("StudyDate", "00080020", "DA", Level.STUDY, "study_date", True),
    Attribute("StudyTime", "00080030", "TM", Level.STUDY, "study_time", True),
    Attribute("AccessionNumber", "00080050", "SH", Level.STUDY, "accession_number", True),
    Attribute("ModalitiesInStudy", "00080061", "CS", Level.STUDY, "modalities", True),
    Attribute("ReferringPhysicianName", "00080090", "PN", Level.STUDY, "referring_physician", True),
    Attribute("StudyDescription", "00081030", "LO", Level.STUDY, "description"),
    Attribute("PatientName", "00100010", "PN", Level.STUDY, "patient_name", True),
    Attribute("PatientID", "00100020", "LO", Level.STUDY, "patient_id", True),
    Attribute("IssuerOfPatientID", "00100021", "LO", Level.STUDY, "issuer_of_patient_id"),
    Attribute("PatientBirthDate", "00100030", "DA", Level.STUDY, "patient_birth_date", True),
    Attribute("PatientSex", "00100040", "CS", Level.STUDY, "patient_sex", True),
    Attribute("StudyInstanceUID", "0020000D", "UI", Level.STUDY, "study_instance_uid", True),
    Attribute("StudyID", "00200010", "SH", Level.STUDY, "study_id", True),
    Attribute("NumberOfStudyRelatedSeries", "00201206", "IS", Level.STUDY, "num_series", True),
    Attribute(
        "NumberOfStudyRelatedInstances", "00201208", "IS", Level.STUDY, "num_instances", True
    ),
    Attribute("Modality", "00080060", "CS", Level.SERIES, "modality", True),
    Attribute("SeriesDescription", "0008103E", "LO", Level.SERIES, "description", True),
    Attribute("BodyPartExamined", "00180015", "CS", Level.SERIES, "body_part"),
    Attribute("SeriesInstanceUID", "0020000E", "UI", Level.SERIES, "series_instance_uid", True),
    Attribute("SeriesNumber", "00200011", "IS", Level.SERIES, "series_number", True),
    Attribute(
        "NumberOfSeriesRelatedInstances", "00201209", "IS", Level.SERIES, "num_instances", True
    ),
    Attribute("SOPClassUID", "00080016", "UI", Level.INSTANCE, "sop_class_uid", True),
    Attribute("SOPInstanceUID", "00080018", "UI", Level.INSTANCE, "sop_instance_uid", True),
    Attribute(
        "AvailableTransferSyntaxUID", "00083002", "UI", Level.INSTANCE, "transfer_syntax_uid"
    ),
    Attribute("InstanceNumber", "00200013", "IS", Level.INSTANCE, "instance_number", True),
    Attribute("NumberOfFrames", "00280008", "IS", Level.INSTANCE, "number_of_frames", True),
    Attribute("Rows", "00280010", "US", Level.INSTANCE, "rows", True),
    Attribute("Columns", "00280011", "US", Level.INSTANCE, "columns", True),
)
BY_NAME = {a.keyword.lower(): a for a in ATTRIBUTES} | {a.tag.lower(): a for a in ATTRIBUTES}
_DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
# From each level's row to the row of a level at or above it.
_PATH = {
    (Level.STUDY, Level.STUDY): "",
    (Level.SERIES, Level.STUDY): "study__",
    (Level.SERIES, Level.SERIES): "",
    (Level.INSTANCE, Level.STUDY): "series__study__",
    (Level.INSTANCE, Level.SERIES): "series__",
    (Level.INSTANCE, Level.INSTANCE): "",
}
_MODEL: dict[Level, type[Model]] = {
    Level.STUDY: Study,
    Level.SERIES: Series,
    Level.INSTANCE: Instance,
}
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
# A parent's UIDs come with every series and instance (OHIF groups /series answers by study).
_PARENT_UIDS = {
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.INSTANCE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def available(level: Level) -> list[Attribute]:
    """What can be matched and returned at `level`: its own attributes and its parents'."""
    return [a for a in ATTRIBUTES if _DEPTH[a.level] <= _DEPTH[level]]


def _column(level: Level, attribute: Attribute) -> str:
    return _PATH[(level, attribute.level)] + attribute.field


@dataclass
class Search:
    """A QIDO request, read and checked."""

    level: Level
    filters: list[Q]
    fields: list[Attribute]
    limit: int
    offset: int
    warnings: list[str]
    # Matched on SOP Instance UID: the instances are looked up by (facility, UID), the index
    # every stored instance has, instead of through their studies.
    by_instance_uid: bool = False


def search_parse(
    level: Level, params: Iterable[tuple[str, str]], *, fixed: dict[str, str] | None = None
) -> Search:
    """A search from the query string's (key, value) pairs; `fixed` are the UIDs of the path
    (`/studies/{S}/series`). QueryError for what cannot be read."""
    offered = {a.keyword: a for a in available(level)}
    filters: list[Q] = []
    include: list[Attribute] = []
    include_all = False
    unknown: list[str] = []
    limit = MAX_RESULTS
    offset = 0
    warnings: list[str] = []
    by_instance_uid = False
    for keyword, value in (fixed or {}).items():
        filters.append(_match(level, offered[keyword], value))
    for key, value in params:
        name = key.strip()
        lowered = name.lower()
        if lowered == "limit":
            limit = min(_count(value, "limit"), MAX_RESULTS)
        elif lowered == "offset":
            offset = _count(value, "offset")
            if offset > MAX_OFFSET:
                raise QueryError(f"offset may be at most {MAX_OFFSET}.")
        elif lowered == "fuzzymatching":
            if value.strip().lower() == "true":
                warnings.append(WARN_FUZZY)
            elif value.strip().lower() not in ("false", ""):
                raise QueryError("fuzzymatching is true or false.")
        elif lowered == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item.lower() == "all":
                    include_all = True
                elif item:
                    found = BY_NAME.get(item.lower())
                    if found is not None and found.keyword in offered:
                        include.append(found)
        else:
            attribute = BY_NAME.get(lowered)
            if attribute is None or attribute.keyword not in offered:
                unknown.append(name[:64])
                continue
            filters.append(_match(level, attribute, value))
            if attribute.keyword == "SOPInstanceUID" and level == Level.INSTANCE and value.strip():
                by_instance_uid = True
    if unknown:
        names = ", ".join(sorted(set(unknown))[:20])
        warnings.append(f"The following attributes are not supported for matching: {names}")
    wanted = {a.keyword for a in available(level) if a.level == level and a.required}
    wanted |= set(_PARENT_UIDS[level])
    wanted |= {a.keyword for a in include}
    if include_all:
        wanted |= set(offered)
    fields = [a for a in ATTRIBUTES if a.keyword in wanted]
    return Search(level, filters, fields, max(limit, 0), offset, warnings, by_instance_uid)


def _count(value: str, name: str) -> int:
    value = value.strip()
    if not value.isdigit() or len(value) > 9:
        raise QueryError(f"{name} is a whole number, not {value[:20]!r}.")
    return int(value)


# --- matching ----------------------------------------------------------------------------------

_WILDCARD = re.compile(r"[*?]")
_STAR_RUN = re.compile(r"\*+")


def _match(level: Level, attribute: Attribute, raw: str) -> Q:
    value = raw.strip()
    if value in ("", "*"):
        return Q()  # universal matching
    column = _column(level, attribute)
    match attribute.vr:
        case "UI":
            return _uid_match(column, attribute, value)
        case "DA":
            return _range_match(column, attribute, value, _date)
        case "TM":
            return _range_match(column, attribute, value, _time)
        case "IS" | "US":
            number = value.lstrip("+-")
            if not number.isdigit() or len(number) > 12:
                raise QueryError(f"{attribute.keyword} is a number, not {value[:20]!r}.")
            return Q(**{column: int(value)})
    if attribute.keyword == "ModalitiesInStudy":
        return _any_of(
            [Q(**{f"{column}__contains": f",{item},"}) for item in _list(attribute, value)]
        )
    if attribute.vr == "CS" and "\\" in value:
        return _any_of([Q(**{column: item}) for item in _list(attribute, value)])
    insensitive = attribute.vr == "PN"
    if _WILDCARD.search(value):
        pattern = _wildcard_regex(value)
        return Q(**{f"{column}__{'iregex' if insensitive else 'regex'}": pattern})
    return Q(**{f"{column}__{'iexact' if insensitive else 'exact'}": value})


def _any_of(conditions: list[Q]) -> Q:
    combined = Q()
    for condition in conditions:
        combined |= condition
    return combined


def _list(attribute: Attribute, value: str) -> list[str]:
    items = [item.strip() for item in value.split("\\") if item.strip()]
    if len(items) > MAX_LIST:
        raise QueryError(f"{attribute.keyword} lists more than {MAX_LIST} values.")
    return items


def _uid_match(column: str, attribute: Attribute, value: str) -> Q:
    uids = _list(attribute, value)
    for uid in uids:
        if not is_valid_uid(uid):
            raise QueryError(f"{attribute.keyword} holds a value that is not a UID: {uid[:70]!r}.")
    return Q(**{f"{column}__in": uids})


def _wildcard_regex(value: str) -> str:
    """`*` any run, `?` one character, everything else literal; the whole value must match."""
    value = _STAR_RUN.sub("*", value)
    parts = []
    for char in value:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char.isalnum() or char == " ":
            parts.append(char)
        else:
            parts.append("\\" + char)
    return "^" + "".join(parts) + "$"


def _date(value: str, keyword: str) -> dt.date:
    if len(value) == 8 and value.isdigit():
        try:
            return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
        except ValueError:
            pass
    raise QueryError(f"{keyword} is a date as YYYYMMDD (or a range A-B), not {value[:20]!r}.")


_TM = re.compile(r"^(\d\d)(?::?(\d\d)(?::?(\d\d)(?:\.(\d{1,6}))?)?)?$")


def _time(value: str, keyword: str) -> dt.time:
    found = _TM.match(value)
    if found is not None:
        hour, minute, second, fraction = found.groups()
        try:
            return dt.time(
                int(hour),
                int(minute or 0),
                int(second or 0),
                int((fraction or "0").ljust(6, "0")),
            )
        except ValueError:
            pass
    raise QueryError(f"{keyword} is a time as HHMMSS (or a range A-B), not {value[:20]!r}.")


def _range_match(
    column: str, attribute: Attribute, value: str, parse: Callable[[str, str], Any]
) -> Q:
    if value.count("-") > 1:
        parse(value, attribute.keyword)  # refused, with what the value should look like
    if "-" not in value:
        return Q(**{column: parse(value, attribute.keyword)})
    low, high = (part.strip() for part in value.split("-"))
    if not low and not high:
        return Q()
    condition = Q()
    if low:
        condition &= Q(**{f"{column}__gte": parse(low, attribute.keyword)})
    if high:
        bound = parse(high, attribute.keyword)
        if attribute.vr == "TM" and len(high) <= 4:
            # "-1030" includes 10:30:59: a time given to the minute (or hour) covers all of it.
            step = dt.timedelta(hours=1) if len(high) == 2 else dt.timedelta(minutes=1)
            moment = dt.datetime.combine(dt.date(2000, 1, 1), bound) + step
            condition &= Q(**{f"{column}__lt": moment.time()}) if moment.day == 1 else Q()
        else:
            condition &= Q(**{f"{column}__lte": bound})
    return condition


# --- answering ---------------------------------------------------------------------------------


def search_run(
    search: Search,
    visible: QuerySet[Study],
    *,
    retrieve_base: str,
    facilities: QuerySet[Any] | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """(the DICOM JSON objects of one page, whether more results follow) in one statement.

    `retrieve_base` is the absolute URL of /dicom-web/ (for RetrieveURL); `facilities`, the ids
    of the facilities holding the visible studies (or more), narrows a search by SOP Instance
    UID to an index."""
    level = search.level
    model = _MODEL[level]
    study_path = _PATH[(level, Level.STUDY)]
    if level == Level.STUDY:
        # The visible studies themselves, not the studies whose pk is among them: one scan of
        # the study table that can walk an index in the answer's order and stop at the page's
        # end, checking each row as it goes (issue 17, bench/index_scale.py).
        queryset = visible
    else:
        queryset = model.objects.filter(**{f"{study_path}pk__in": visible.values("pk")})  # type: ignore[attr-defined]
    if search.by_instance_uid and facilities is not None:
        # Every instance belongs to its study's facility: naming those facilities lets
        # PostgreSQL find the UID through instance_unique_per_facility (a few index probes)
        # instead of reading the whole instance table (574 ms at 10 million, issue 17). The
        # visible studies still decide what is answered.
        queryset = queryset.filter(facility_id__in=facilities)
    for condition in search.filters:
        queryset = queryset.filter(condition)
    columns = {a.keyword: _column(level, a) for a in search.fields}
    for keyword in _PARENT_UIDS[level]:
        columns.setdefault(keyword, _column(level, BY_NAME[keyword.lower()]))
    ordering = {
        Level.STUDY: (F("study_date").desc(nulls_last=True), "pk"),
        Level.SERIES: ("study_id", F("series_number").asc(nulls_last=True), "pk"),
        Level.INSTANCE: ("series_id", F("instance_number").asc(nulls_last=True), "pk"),
    }[level]
    end = search.offset + search.limit
    rows = list(queryset.order_by(*ordering).values(*columns.values())[search.offset : end + 1])
    more = len(rows) > search.limit
    answers = [_json(search, columns, row, retrieve_base) for row in rows[: search.limit]]
    return answers, more


def _json(
    search: Search, columns: dict[str, str], row: dict[str, Any], base: str
) -> dict[str, Any]:
    out: dict[str, Any] = {SPECIFIC_CHARACTER_SET: {"vr": "CS", "Value": ["ISO_IR 192"]}}
    for attribute in search.fields:
        out[attribute.tag] = _element(attribute, row[columns[attribute.keyword]])
    study = row[columns["StudyInstanceUID"]]
    url = f"{base}studies/{study}"
    if search.level != Level.STUDY:
        url += f"/series/{row[columns['SeriesInstanceUID']]}"
    if search.level == Level.INSTANCE:
        url += f"/instances/{row[columns['SOPInstanceUID']]}"
    out[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))


def _element(attribute: Attribute, value: Any) -> dict[str, Any]:
    element: dict[str, Any] = {"vr": attribute.vr}
    if value is None or value == "":
        return element
    if attribute.keyword == "ModalitiesInStudy":
        values: list[Any] = [m for m in str(value).split(",") if m]
    elif attribute.vr == "PN":
        values = [{"Alphabetic": value}]
    elif attribute.vr == "DA":
        values = [value.strftime("%Y%m%d")]
    elif attribute.vr == "TM":
        values = [value.strftime("%H%M%S.%f" if value.microsecond else "%H%M%S")]
    elif attribute.vr in ("IS", "US"):
        values = [int(value)]
    else:
        values = [value]
    if values:
        element["Value"] = values
    return element
