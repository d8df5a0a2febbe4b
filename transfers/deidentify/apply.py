"""One data set de-identified by the table (`profile`), with a copy's keys: pure, no database.

Every attribute, at every depth of every sequence, gets its action from `profile.action_for`:
X removed, Z emptied, D a dummy of its VR, U a UID derived from the original with the copy's key
(so one original UID gives one new UID across the whole copy: Study, Series, SOP Instance,
Frame of Reference and every Referenced ... UID inside sequences agree), K kept, C cleaned (a
date shifted by the copy's offset; a text with every known identifier of the original taken
out). A sequence that is kept, replaced (D) or remapped (U) keeps its items, each de-identified
the same way. Attributes the table does not name are kept. The pixel data is not touched.

The patient gets the copy's pseudonym (Patient's Name and ID, which the table empties or
replaces), and the data set says what was done (PS3.15 E.1.1: Patient Identity Removed, the
De-identification Method and its Code Sequence; with modified dates, Longitudinal Temporal
Information Modified).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from ..sharing.message import date_pattern
from .profile import BASIC_PROFILE_CODE, OPTION_CODES, action_for

DUMMY_TEXT = "ANONYMIZED"
DUMMY_DATE = "19000101"
DUMMY_BY_VR = {
    "PN": "ANONYMOUS",
    "DA": DUMMY_DATE,
    "DT": DUMMY_DATE + "000000",
    "TM": "000000",
    "IS": "0",
    "DS": "0",
    "AS": "000D",
    "CS": DUMMY_TEXT,
    "AE": DUMMY_TEXT,
}
NUMERIC_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
REMOVED_TEXT = "[removed]"
# Identifiers shorter than this are not scrubbed from descriptors (a middle initial "A" would
# take out every "A" on its own); longer ones are taken out as whole words only.
MIN_SCRUB = 2
# A digit run of an ID at least this long is an identifier on its own ("MRN 12345").
MIN_ID_DIGITS = 4


@dataclass
class CopyKeys:
    """What one de-identified copy is made with: kept in its mapping, at the sending facility."""

    key: bytes
    date_offset_days: int
    patient_name: str
    patient_id: str
    options: frozenset[str] = frozenset()
    # Every known identifier of the original, scrubbed from the text a clean action keeps.
    identifiers: list[str] = field(default_factory=list)
    # original UID -> new UID, filled as they are met
    uid_map: dict[str, str] = field(default_factory=dict)

    def uid(self, original: str) -> str:
        """A new UID for `original`, the same every time with this key: 2.25 and 128 bits of
        HMAC-SHA256 (PS3.5 B.2, a UUID-derived UID)."""
        original = original.strip().rstrip("\x00")
        if not original:
            return original
        new = self.uid_map.get(original)
        if new is None:
            digest = hmac.new(self.key, original.encode(), hashlib.sha256).digest()
            new = f"2.25.{int.from_bytes(digest[:16], 'big')}"
            self.uid_map[original] = new
        return new


def identifiers_of(ds: Dataset) -> list[str]:
    """The identifying strings of one original data set that a cleaned text must not carry:
    the patient's name (and each component), ID, other IDs, birth date, accession number,
    institution, and the people named in it."""
    found: set[str] = set()
    for keyword in (
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "PatientBirthDate",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "NameOfPhysiciansReadingStudy",
        "RequestingPhysician",
        "StationName",
        "StudyID",
    ):
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        for one in value if isinstance(value, MultiValue) else [value]:
            text = str(one).strip()
            if not text:
                continue
            found.add(text)
            found.update(part for part in re.split(r"[\^=\s,]+", text) if part)
            if keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber"):
                # "MRN12345" is also written "MRN 12345" or "12345".
                found.update(run for run in re.findall(r"\d+", text) if len(run) >= MIN_ID_DIGITS)
    # Every part of two characters or more: matched as whole words (_scrub), "LI" never cuts
    # "AXIAL", while a short name like Wu or Li is still taken out.
    return sorted((s for s in found if len(s) >= MIN_SCRUB), key=len, reverse=True)


def _scrub(text: str, identifiers: Iterable[str]) -> str:
    """`text` with each identifier taken out as a whole word (any case), and a birth date among
    them in every written form (1965-04-12, 04/12/1965, April 12, 1965, ...)."""
    for word in identifiers:
        pattern = rf"(?<![0-9A-Za-z]){re.escape(word)}(?![0-9A-Za-z])"
        text = re.sub(pattern, REMOVED_TEXT, text, flags=re.IGNORECASE)
        if re.fullmatch(r"\d{8}", word):
            try:
                born = date(int(word[:4]), int(word[4:6]), int(word[6:]))
            except ValueError:
                continue
            text = date_pattern(born).sub(REMOVED_TEXT, text)
    return text


def _shift_date(value: str, days: int) -> str:
    """A DA value moved by whole days; a value that is no full date is emptied (it cannot be
    moved and keep its meaning)."""
    text = value.strip()
    if not re.fullmatch(r"\d{8}", text):
        return ""
    try:
        day = date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return ""
    return (day + timedelta(days=days)).strftime("%Y%m%d")


def _shift_datetime(value: str, days: int) -> str:
    text = value.strip()
    if len(text) < 8:
        return ""
    shifted = _shift_date(text[:8], days)
    return shifted + text[8:] if shifted else ""


def _clean(element: DataElement, keys: CopyKeys) -> None:
    """C: a date moved by the copy's offset (a time stays: the offset is whole days), a text with
    every identifier of the original taken out."""
    vr = element.VR
    if element.value in (None, ""):
        return
    if vr == "DA":
        element.value = _multi(element.value, lambda v: _shift_date(v, keys.date_offset_days))
    elif vr == "DT":
        element.value = _multi(element.value, lambda v: _shift_datetime(v, keys.date_offset_days))
    elif vr == "TM":
        return
    elif vr in {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"}:
        element.value = _multi(element.value, lambda v: _scrub(str(v), keys.identifiers))
    elif vr == "UI":
        element.value = _multi(element.value, keys.uid)
    elif vr == "SQ":
        for item in element.value:
            _walk(item, keys)


def _multi(value: Any, change: Callable[[str], str]) -> Any:
    """`change` applied to each value of a multi-valued element, or to its one value."""
    if isinstance(value, MultiValue | list | tuple):
        return [change(str(v)) for v in value]
    return change(str(value))


def _dummy(element: DataElement, keys: CopyKeys) -> None:
    vr = element.VR
    if vr == "SQ":
        # A sequence is replaced by itself, de-identified: its items' attributes follow the table.
        for item in element.value:
            _walk(item, keys)
    elif vr == "UI":
        element.value = _multi(element.value, keys.uid) if element.value else element.value
    elif vr in NUMERIC_VRS:
        element.value = 0
    elif vr in BINARY_VRS:
        element.value = b"\x00\x00"  # non-zero length, even
    else:
        dummy = DUMMY_BY_VR.get(vr, DUMMY_TEXT)
        element.value = dummy


def _empty(element: DataElement) -> None:
    element.value = Sequence() if element.VR == "SQ" else None


def _walk(ds: Dataset, keys: CopyKeys) -> None:
    for element in list(ds):
        tag = int(element.tag)
        action = action_for(tag, options=keys.options)
        if tag in (0x00100010, 0x00100020):
            continue  # the pseudonym, set below for the top level; in an item: emptied
        if action is None or action == "K":
            if element.VR == "SQ":
                for item in element.value:
                    _walk(item, keys)
            continue
        if action == "X":
            del ds[element.tag]
        elif action == "Z":
            _empty(element)
        elif action == "D":
            _dummy(element, keys)
        elif action == "U":
            if element.VR == "SQ":
                for item in element.value:
                    _walk(item, keys)
            elif element.value:
                element.value = _multi(element.value, keys.uid)
        elif action == "C":
            _clean(element, keys)
        else:  # pragma: no cover - the table has no other code
            raise ValueError(f"unknown action {action} for {element.tag}")


def dataset_deidentify(ds: Dataset, keys: CopyKeys) -> Dataset:
    """De-identify `ds` in place with the copy's keys and return it, with a new file meta."""
    _walk(ds, keys)
    # Patient's Name and ID anywhere below the top level (an item naming the patient): emptied.
    for item in _items(ds):
        for tag in (0x00100010, 0x00100020):
            if tag in item:
                item[tag].value = None
    ds.PatientName = keys.patient_name
    ds.PatientID = keys.patient_id
    ds.PatientIdentityRemoved = "YES"
    codes = [BASIC_PROFILE_CODE] + [OPTION_CODES[o] for o in sorted(keys.options)]
    ds.DeidentificationMethod = "PS3.15 " + " + ".join(value for value, _ in codes)
    method_codes = Sequence()
    for value, meaning in codes:
        code = Dataset()
        code.CodeValue = value
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = meaning
        method_codes.append(code)
    ds.DeidentificationMethodCodeSequence = method_codes
    if "retain_dates" in keys.options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    meta = FileMetaDataset()
    old_meta = getattr(ds, "file_meta", None)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = old_meta.TransferSyntaxUID  # type: ignore[union-attr]
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _items(ds: Dataset) -> Iterable[Dataset]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield item
                yield from _items(item)
