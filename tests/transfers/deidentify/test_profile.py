"""The profile attribute by attribute: a data set holding every single-tag attribute of PS3.15
Table E.1-1 (each with a value of its VR) is de-identified, and each attribute is checked
against its action in the table, without and with each option."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from transfers.deidentify.apply import CopyKeys, dataset_deidentify
from transfers.deidentify.profile import BASIC, OPTION_COLUMNS, action_for

PSEUDONYM_TAGS = {0x00100010, 0x00100020}  # Patient's Name and ID: the pseudonym
ADDED_TAGS = {0x00120062, 0x00120063, 0x00120064, 0x00280303}  # what de-identification adds
ORIGINAL_UID = "1.2.826.0.1.3680043.99.{n}"


def _value(vr: str, n: int) -> Any:
    if vr == "PN":
        return f"DOE{n}^JANE"
    if vr == "DA":
        return "20200115"
    if vr == "DT":
        return "20200115101010"
    if vr == "TM":
        return "101010"
    if vr == "UI":
        return ORIGINAL_UID.format(n=n)
    if vr in ("IS",):
        return "7"
    if vr == "DS":
        return "1.5"
    if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return 5
    if vr in ("FL", "FD"):
        return 1.5
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b"\x01\x02"
    if vr == "AS":
        return "045Y"
    if vr == "AT":
        return 0x00100010
    if vr == "SQ":
        item = Dataset()
        item.ReferencedSOPInstanceUID = ORIGINAL_UID.format(n=100000 + n)
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        return Sequence([item])
    return f"ORIG{n}"[:16]


def _table_tags() -> list[tuple[int, str]]:
    """Every single tag of the table pydicom's dictionary gives one VR for, outside the file
    meta and command groups."""
    tags = []
    for tag in sorted(BASIC):
        if tag >> 16 in (0x0000, 0x0002):
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if " or " in vr:
            continue
        tags.append((tag, vr))
    return tags


TAGS = _table_tags()


def _rich() -> tuple[Dataset, dict[int, Any]]:
    ds = Dataset()
    values = {}
    for n, (tag, vr) in enumerate(TAGS):
        values[tag] = _value(vr, n)
        ds.add_new(tag, vr, values[tag])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds, values


def _keys(options: frozenset[str] = frozenset()) -> CopyKeys:
    return CopyKeys(
        key=b"k" * 32,
        date_offset_days=-400,
        patient_name="ANON^TEST",
        patient_id="ANON-TEST",
        options=options,
    )


def test_the_table_is_the_standards_with_its_options() -> None:
    assert len(TAGS) > 500  # the 2026c table names some 650 attributes
    assert BASIC[0x00100010] == "Z"  # Patient's Name
    assert BASIC[0x0020000D] == "U"  # Study Instance UID
    assert BASIC[0x00080080] == "X/Z/D"  # Institution Name
    assert OPTION_COLUMNS["retain_dates"][0x00080020] == "C"  # Study Date
    assert OPTION_COLUMNS["retain_device"][0x00181000] == "K"  # Device Serial Number
    assert OPTION_COLUMNS["clean_descriptors"][0x0008103E] == "C"  # Series Description


@pytest.mark.parametrize(
    "options",
    [
        frozenset(),
        frozenset({"retain_dates"}),
        frozenset({"clean_descriptors"}),
        frozenset({"retain_device"}),
        frozenset({"retain_dates", "clean_descriptors", "retain_device"}),
    ],
    ids=["basic", "dates", "descriptors", "device", "all options"],
)
def test_it_applies_each_attributes_action_of_the_table(options: frozenset[str]) -> None:
    ds, values = _rich()
    keys = _keys(options)
    dataset_deidentify(ds, keys)
    wrong = []
    for n, (tag, vr) in enumerate(TAGS):
        item_uid = ORIGINAL_UID.format(n=100000 + n)  # the reference inside a sequence's item
        action = action_for(tag, options=options)
        original = values[tag]
        present = tag in ds
        value: Any = ds[tag].value if present else None
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {action}"
        if tag in PSEUDONYM_TAGS:
            ok = str(value) in ("ANON^TEST", "ANON-TEST")
        elif action == "X":
            ok = not present
        elif action == "Z":
            ok = present and (value in (None, "", b"") or (vr == "SQ" and len(value) == 0))
        elif action == "D":
            if vr == "SQ":  # kept, its items de-identified: the reference remapped
                ok = present and value[0].ReferencedSOPInstanceUID == keys.uid(item_uid)
            elif vr == "UI":
                ok = present and value == keys.uid(original)
            else:
                ok = present and value not in (None, "", b"") and value != original
        elif action == "U":
            if vr == "SQ":
                ok = present and value[0].ReferencedSOPInstanceUID == keys.uid(item_uid)
            else:
                ok = present and value == keys.uid(original) and value != original
        elif action == "K":
            ok = present and (vr == "SQ" or value == original)
        elif action == "C":
            if vr == "DA":
                ok = value == "20181211"  # 2020-01-15 moved back 400 days
            elif vr == "DT":
                ok = value == "20181211101010"
            elif vr in ("TM", "SQ") or vr not in ("PN", "LO", "SH", "LT", "ST", "UT", "UC"):
                ok = present
            else:
                ok = present and "[removed]" not in str(value)  # nothing of the patient in it
        else:
            ok = False
        if not ok:
            wrong.append(f"{name} {vr}: {original!r} -> {value!r}")
    assert not wrong, "\n".join(wrong)


def test_it_says_what_was_done_in_the_data_set() -> None:
    ds, _ = _rich()
    dataset_deidentify(ds, _keys(frozenset({"retain_dates", "clean_descriptors"})))
    assert ds.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113107"]
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"


def test_a_clean_descriptor_loses_the_patients_name_and_keeps_the_rest() -> None:
    ds, _ = _rich()
    ds.PatientName = "SMITHERSON^JOHANNA"
    ds.SeriesDescription = "CT chest for Smitherson"
    keys = _keys(frozenset({"clean_descriptors"}))
    from transfers.deidentify.apply import identifiers_of

    keys.identifiers = identifiers_of(ds)
    dataset_deidentify(ds, keys)
    assert ds.SeriesDescription == "CT chest for [removed]"


def test_private_attributes_go() -> None:
    ds, _ = _rich()
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "LO", "DOE^JANE")
    dataset_deidentify(ds, _keys())
    assert 0x00090010 not in ds and 0x00091001 not in ds


def test_clean_descriptors_takes_out_short_names_written_dates_and_id_digits() -> None:
    """Review finding: 'CT HEAD for Wu Li born 1965-04-12 (MRN 12345)' kept Wu, Li, the date and
    the number; AXIAL must keep its letters although the patient is Li."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from transfers.deidentify.apply import CopyKeys, dataset_deidentify, identifiers_of

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.PatientName = "WU^LI"
    ds.PatientID = "MRN12345"
    ds.PatientBirthDate = "19650412"
    ds.StudyDescription = "CT HEAD for Wu Li born 1965-04-12 (MRN 12345), April 12, 1965"
    ds.SeriesDescription = "AXIAL T1 LI WU"
    keys = CopyKeys(
        key=b"k" * 32,
        date_offset_days=-400,
        patient_name="ANON^X",
        patient_id="ANON-X",
        options=frozenset({"clean_descriptors"}),
    )
    keys.identifiers = identifiers_of(ds)
    dataset_deidentify(ds, keys)
    study = str(ds.StudyDescription)
    series = str(ds.SeriesDescription)
    for leak in ("Wu", "Li ", "1965", "12345"):
        assert leak not in study, study
    assert "CT HEAD" in study
    assert series.startswith("AXIAL T1") and " LI" not in series and "WU" not in series
