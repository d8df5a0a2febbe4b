"""Media of patients whose names are not in ASCII, and the disc's label (issue 14, defects 2
and 5): the DICOMDIR of the ZIP and of the disc image gives each name as the instance does,
read back by dcmtk and dicom3tools; the disc's volume identifier is the DICOMDIR's File-set ID
and names no patient (isoinfo)."""

from __future__ import annotations

import io
import re
import subprocess
import unicodedata
import zipfile
from pathlib import Path
from typing import Any

import pycdlib
import pydicom
import pytest
from django.test import Client
from pydicom.data import get_charset_files
from pydicom.uid import generate_uid

from portal.models import Facility, User
from tests.helpers import client_for, require_peer, upload
from transfers.models import ExportStatus, MediaExport, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = [pytest.mark.django_db, pytest.mark.peer]

# pydicom's character set examples (PS3.5 Annex H-K): Cyrillic (ISO_IR 144), Arabic
# (ISO_IR 127), Japanese with ISO 2022 code extensions (ISO 2022 IR 87) and Chinese (UTF-8).
CHARSET_FILES = ["chrRuss.dcm", "chrArab.dcm", "chrH31.dcm", "chrX1.dcm"]


def _source(name: str) -> pydicom.Dataset:
    # get_testdata_file does not look in pydicom's charset_files; this does.
    return pydicom.dcmread(get_charset_files(name)[0])


def _charset_bytes(name: str, study_uid: str) -> bytes:
    ds = _source(name)
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, check=False, timeout=60)
    return result.stdout.decode("utf-8") + result.stderr.decode("utf-8", "replace")


def _names(path: Path) -> list[str]:
    """Every PatientName in the file as dcmtk decodes it (+U8: to UTF-8, by the Specific
    Character Set in force where it stands: a directory record's own, or the dataset's)."""
    dcmdump = require_peer("dcmdump")
    output = _run(dcmdump, "+U8", "+L", "+P", "PatientName", str(path))
    assert "E: " not in output, output
    return re.findall(r"^\s*\(0010,0010\) PN \[(.*)\]", output, flags=re.MULTILINE)


def _file_set_id(path: Path) -> str:
    output = _run(require_peer("dcmdump"), "+P", "FileSetID", str(path))
    found = re.search(r"\(0004,1130\) CS \[(.*)\]", output)
    assert found, output
    return found.group(1)


@pytest.fixture(params=CHARSET_FILES)
def charset_study(request: Any, client: Client, bob_token: str) -> tuple[Study, str]:
    """One study of two images of a pydicom character set example, and the name pydicom
    decodes from the source file."""
    study_uid = generate_uid()
    for _ in range(2):
        data = _charset_bytes(request.param, study_uid)
        assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get(study_instance_uid=study_uid), str(_source(request.param).PatientName)


def _check_dicomdir(root: Path, expected: str) -> None:
    dicomdir = root / "DICOMDIR"
    names = _names(dicomdir)
    # The PATIENT record has the name, in the instance's own Unicode.
    assert names == [expected]
    # And so has each instance it lists (pydicom: this dcmtk, built on glibc's iconv, cannot
    # convert ISO 2022 IR 87, which the Japanese example is written in).
    for record in pydicom.dcmread(dicomdir).DirectoryRecordSequence:
        if "ReferencedFileID" in record:
            instance = pydicom.dcmread(root.joinpath(*record.ReferencedFileID))
            assert str(instance.PatientName) == expected
    # dicom3tools reads the DICOMDIR without complaint.
    dcdirdmp = require_peer("dcdirdmp")
    result = subprocess.run([dcdirdmp, str(dicomdir)], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert b"Error" not in result.stderr, result.stderr.decode("utf-8", "replace")


def test_the_zip_dicomdir_names_the_patient_as_the_images_do(
    charset_study: tuple[Study, str], bob: User, tmp_path: Path
) -> None:
    study, expected = charset_study
    response: Any = client_for(bob).get(f"/studies/{study.uuid}/download/")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        archive.extractall(tmp_path / "zip")
    _check_dicomdir(tmp_path / "zip", expected)


def _ascii_words(name: str) -> set[str]:
    """The runs of letters a label could be made of: "Yamada^Tarou" gives YAMADA and TAROU."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().upper()
    return {word for word in re.findall(r"[A-Z]{3,}", folded)}


def _disc(study: Study, by: User, capture: Any, tmp_path: Path) -> tuple[Path, MediaExport]:
    """The disc image as a recipient gets it: asked for, built by the task, downloaded."""
    client = client_for(by)
    with capture(execute=True):
        assert client.post(f"/studies/{study.uuid}/cd/").status_code == 302
    export = MediaExport.objects.get(study=study)
    assert export.status == ExportStatus.READY, export.error
    download: Any = client.get(f"/studies/{study.uuid}/cd/{export.uuid}/download/")
    target = tmp_path / "disc.iso"
    target.write_bytes(b"".join(download.streaming_content))
    return target, export


def _share(study: Study, bob: User, gfc: Facility) -> None:
    share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
    )


def _unpack(target: Path, root: Path) -> None:
    iso = pycdlib.PyCdlib()
    iso.open(str(target))
    try:
        for dirname, _, filenames in iso.walk(joliet_path="/"):
            for name in filenames:
                local = root / dirname.lstrip("/") / name
                local.parent.mkdir(parents=True, exist_ok=True)
                with local.open("wb") as out:
                    iso.get_file_from_iso_fp(out, joliet_path=f"{dirname.rstrip('/')}/{name}")
    finally:
        iso.close()


def test_the_disc_dicomdir_names_the_patient_as_the_images_do(
    charset_study: tuple[Study, str],
    bob: User,
    dana: User,
    gfc: Facility,
    tmp_path: Path,
    django_capture_on_commit_callbacks: Any,
) -> None:
    study, expected = charset_study
    _share(study, bob, gfc)
    target, _ = _disc(study, dana, django_capture_on_commit_callbacks, tmp_path)
    _unpack(target, tmp_path / "disc")
    _check_dicomdir(tmp_path / "disc", expected)


@pytest.mark.parametrize("example", ["chrH31.dcm", "chrX1.dcm"])
def test_the_disc_is_labelled_with_its_file_set_id_and_no_patient_name(
    example: str,
    client: Client,
    bob: User,
    bob_token: str,
    dana: User,
    gfc: Facility,
    tmp_path: Path,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Yamada^Tarou and Wang^XiaoDong have Latin names that a label could be made of."""
    study_uid = generate_uid()
    assert upload(client, _charset_bytes(example, study_uid), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get(study_instance_uid=study_uid)
    _share(study, bob, gfc)
    target, export = _disc(study, dana, django_capture_on_commit_callbacks, tmp_path)
    _unpack(target, tmp_path / "disc")

    isoinfo = require_peer("isoinfo")
    info = _run(isoinfo, "-d", "-i", str(target))
    volume = re.search(r"^Volume id: (.*)$", info, flags=re.MULTILINE)
    assert volume, info
    file_set_id = _file_set_id(tmp_path / "disc" / "DICOMDIR")
    # PS3.12 F.1.1: the File-set ID is the volume identifier; the page and Joliet say the same.
    assert volume.group(1).strip() == file_set_id == export.volume_label
    joliet = _run(isoinfo, "-d", "-J", "-i", str(target))
    assert re.search(rf"^Volume id: {file_set_id}\s*$", joliet, flags=re.MULTILINE), joliet
    # A File-set ID is CS of at most 16 characters; a volume identifier is d-characters.
    assert re.fullmatch(r"[A-Z0-9_]{1,16}", file_set_id)
    # No part of the patient's name is on the label, nor anywhere in the volume descriptors.
    words = _ascii_words(str(_source(example).PatientName))
    assert words and not any(word in file_set_id for word in words)
    assert not any(word in info.upper() or word in joliet.upper() for word in words)


@pytest.mark.parametrize("from_headers", [False, True], ids=["index", "headers"])
def test_a_study_of_images_in_two_character_sets_lists_each_name_right(
    from_headers: bool,
    client: Client,
    bob: User,
    bob_token: str,
    tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """One patient's study whose images were written in Cyrillic and in Chinese sets: each
    record says its own set, and the name in the DICOMDIR reads as one of the images does
    (the index's, or the first header's), never as question marks."""
    if from_headers:
        from transfers.media import export

        monkeypatch.setattr(export, "_needs_header", lambda instance, series: True)
    study_uid = generate_uid()
    for example in ("chrRuss.dcm", "chrX1.dcm"):
        data = _source(example)
        data.PatientID = "MIXED-1"
        data.StudyInstanceUID = study_uid
        data.SOPInstanceUID = generate_uid()
        data.file_meta.MediaStorageSOPInstanceUID = data.SOPInstanceUID
        buffer = io.BytesIO()
        data.save_as(buffer, enforce_file_format=True)
        assert upload(client, buffer.getvalue(), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get(study_instance_uid=study_uid)
    response: Any = client_for(bob).get(f"/studies/{study.uuid}/download/")
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as archive:
        archive.extractall(tmp_path / "zip")
    names = _names(tmp_path / "zip" / "DICOMDIR")
    sent = {str(_source(n).PatientName) for n in ("chrRuss.dcm", "chrX1.dcm")}
    assert len(names) == 1 and names[0] in sent
    if not from_headers:
        assert names == [study.patient_name]
    records = pydicom.dcmread(tmp_path / "zip" / "DICOMDIR").DirectoryRecordSequence
    assert sum(1 for r in records if r.DirectoryRecordType == "IMAGE") == 2


def test_records_made_from_stored_headers_name_the_patient_too(
    charset_study: tuple[Study, str], bob: User, tmp_path: Path, monkeypatch: Any
) -> None:
    """The records of RT, SR and other objects are made from the stored header, in the
    instance's own character set, rather than from the index: the same names come out."""
    from transfers.media import export

    monkeypatch.setattr(export, "_needs_header", lambda instance, series: True)
    study, expected = charset_study
    plan = export.export_plan(studies=[study], reports_of=lambda s: ())
    with zipfile.ZipFile(io.BytesIO(b"".join(export.zip_stream(plan)))) as archive:
        archive.extractall(tmp_path / "zip")
    _check_dicomdir(tmp_path / "zip", expected)
