"""Export: studies as IHE PDI media, as a streamed ZIP and as an ISO 9660 + Joliet CD image,
checked with zipfile and pycdlib and read by dcmtk and dicom3tools."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import zipfile
from datetime import date
from pathlib import Path
from typing import Any

import pycdlib
import pydicom
import pytest
from django.core.files.storage import storages
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from pydicom.uid import generate_uid

from portal.models import User
from tests.helpers import dicom_bytes, require_peer, upload
from transfers.media.export import (
    CD_BYTES,
    DVD_BYTES,
    ExportError,
    ExportPlan,
    export_plan,
    iso_build,
    iso_size,
    media_kind_for,
    volume_label_for,
    zip_size,
    zip_stream,
)
from transfers.models import Instance, Study
from transfers.reports import report_attach, reports_for


def _owner_reports(study: Study):  # type: ignore[no-untyped-def]
    """What the facility holding the study exports: every report."""
    return reports_for(study, share_ids=None)


pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
COMPONENT = re.compile(r"^[A-Z0-9_]{1,8}$")
PATIENT = {"PatientID": "RELAY-42", "PatientName": "O'Brien^Mary"}


def _upload_study(client: Any, token: str, *, ct: int = 3, **changes: Any) -> Study:
    """One study: `ct` CT slices in one series and an MR image in a second series."""
    study_uid = generate_uid()
    fields = {**PATIENT, "StudyInstanceUID": study_uid, "StudyDate": "20240115", **changes}
    ct_series = generate_uid()
    for number in range(1, ct + 1):
        data = dicom_bytes(
            "CT_small.dcm", SeriesInstanceUID=ct_series, InstanceNumber=number, **fields
        )
        assert upload(client, data, token=token).status_code == 201
    data = dicom_bytes("MR_small.dcm", SeriesInstanceUID=generate_uid(), **fields)
    assert upload(client, data, token=token).status_code == 201
    return Study.objects.get(study_instance_uid=study_uid)


@pytest.fixture
def study(client: Any, bob_token: str) -> Study:
    return _upload_study(client, bob_token)


def _zip_bytes(plan: ExportPlan) -> bytes:
    return b"".join(zip_stream(plan))


def _extract(data: bytes, into: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(into)
    return into


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _assert_dcdirdmp_lists(dcdirdmp: str, root: Path, plan: ExportPlan) -> None:
    """dcdirdmp walks the DICOMDIR and prints each image's File ID (with backslashes)."""
    listing = _run(dcdirdmp, str(root / "DICOMDIR"))
    output = listing.stdout + listing.stderr
    assert listing.returncode == 0, output
    assert "Error" not in output, output
    referenced = re.findall(r"-> (\S+)", output)
    expected = [f.path.replace("/", "\\") for s in plan.studies for f in s.instances]
    assert referenced == expected, output


def test_it_lays_out_the_study_as_pdi_media_in_a_zip(study):
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    data = _zip_bytes(plan)
    assert zip_size(plan) == len(data)

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names[:2] == ["README.TXT", "DICOMDIR"]
        for name in names:
            parts = name.split("/")
            assert len(parts) <= 8
            stem, _, extension = parts[-1].partition(".")
            assert all(COMPONENT.match(part) for part in [*parts[:-1], stem]), name
            assert extension == "" or COMPONENT.match(extension) and len(extension) <= 3
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        assert archive.read("DICOMDIR")[128:132] == b"DICM"

        instances = list(Instance.objects.filter(series__study=study))
        planned = plan.studies[0].instances
        assert len(planned) == len(instances) == plan.images == 4
        by_key = {i.storage_key: i for i in instances}
        for media_file in planned:
            stored = by_key[media_file.storage_key]
            content = archive.read(media_file.path)
            assert hashlib.sha256(content).hexdigest() == stored.sha256
            assert len(content) == stored.size_bytes == media_file.size
        assert plan.image_bytes == sum(i.size_bytes for i in instances)
        assert plan.total_bytes == sum(info.file_size for info in archive.infolist())

        readme = archive.read("README.TXT").decode("utf-8")
    assert "Kalispell Regional Medical Center" in readme
    assert "DICOM PS3.10" in readme and "IHE Portable Data for Imaging" in readme
    assert "4 images" in readme
    # Only what the disc needs: no name, ID or birth date of the patient.
    assert "O'Brien" not in readme and "OBRIEN" not in readme.upper()
    assert "RELAY-42" not in readme


def test_the_series_keep_their_order_and_folders(study):
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    paths = [f.path for f in plan.studies[0].instances]
    folders = [p.rsplit("/", 1)[0] for p in paths]
    assert len(set(folders)) == 2  # the CT series and the MR series
    assert folders[:3] == [folders[0]] * 3
    by_key = {i.storage_key: i for i in Instance.objects.filter(series__study=study)}
    ct_numbers = [by_key[f.storage_key].instance_number for f in plan.studies[0].instances[:3]]
    assert ct_numbers == [1, 2, 3]


def test_the_reports_go_on_the_media(study, bob):
    report_attach(study=study, by=bob, pdf=SimpleUploadedFile("r.pdf", PDF))
    report_attach(study=study, by=bob, text="FINDINGS: none.\nIMPRESSION: normal, señor.")
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    data = _zip_bytes(plan)
    assert zip_size(plan) == len(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.read("REPORT/REPORT01.PDF") == PDF
        text = archive.read("REPORT/REPORT02.TXT").decode("utf-8")
        readme = archive.read("README.TXT").decode("utf-8")
    assert text == "FINDINGS: none.\r\nIMPRESSION: normal, señor."
    assert "REPORT/REPORT01.PDF" in readme and "REPORT/REPORT02.TXT" in readme


@pytest.mark.peer
def test_dicom3tools_and_dcmtk_read_the_exported_media(study, bob, tmp_path):
    dciodvfy = require_peer("dciodvfy")
    dcdirdmp = require_peer("dcdirdmp")
    dcmdump = require_peer("dcmdump")
    dcmftest = require_peer("dcmftest")
    report_attach(study=study, by=bob, text="IMPRESSION: normal.")
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    root = _extract(_zip_bytes(plan), tmp_path / "export")

    result = _run(dciodvfy, str(root / "DICOMDIR"))
    output = result.stdout + result.stderr
    # dciodvfy prints problems as "Error - ..." and advice as "Warning - ..."; only errors fail.
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == [] and result.returncode == 0, output

    _assert_dcdirdmp_lists(dcdirdmp, root, plan)

    for media_file in plan.studies[0].instances:
        path = root / media_file.path
        assert _run(dcmftest, str(path)).stdout.startswith("yes:"), path
        dump = _run(dcmdump, "-q", str(path))
        assert dump.returncode == 0, dump.stderr
    assert _run(dcmdump, "-q", str(root / "DICOMDIR")).returncode == 0


def test_the_dicomdir_references_each_file_with_its_own_transfer_syntax(study):
    import pydicom

    plan = export_plan(studies=[study], reports_of=_owner_reports)
    dicomdir = pydicom.dcmread(io.BytesIO(plan.dicomdir.data))
    leaves = [r for r in dicomdir.DirectoryRecordSequence if "ReferencedFileID" in r]
    assert len(leaves) == 4
    by_uid = {i.sop_instance_uid: i for i in Instance.objects.filter(series__study=study)}
    paths = {f.storage_key: f.path for f in plan.studies[0].instances}
    for record in leaves:
        instance = by_uid[record.ReferencedSOPInstanceUIDInFile]
        assert record.ReferencedTransferSyntaxUIDInFile == instance.transfer_syntax_uid
        assert "/".join(record.ReferencedFileID) == paths[instance.storage_key]
    kinds = [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence]
    assert kinds.count("PATIENT") == 1 and kinds.count("STUDY") == 1
    assert kinds.count("SERIES") == 2


def test_the_cd_image_holds_the_same_files(study, bob, tmp_path):
    report_attach(study=study, by=bob, pdf=SimpleUploadedFile("r.pdf", PDF))
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    calls: list[tuple[int, int]] = []
    target = tmp_path / "study.iso"
    with target.open("wb") as out:
        iso_build(plan, out=out, progress=lambda done, total: calls.append((done, total)))
    assert target.stat().st_size == iso_size(plan)
    assert calls and calls[-1][0] == calls[-1][1] == target.stat().st_size
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)

    with zipfile.ZipFile(io.BytesIO(_zip_bytes(plan))) as archive:
        zip_names = sorted(archive.namelist())
        contents = {name: archive.read(name) for name in zip_names}

    iso = pycdlib.PyCdlib()
    iso.open(str(target))
    try:
        # Both labels are the DICOMDIR's File-set ID (PS3.12 F.1.1), which fits Joliet's 16.
        file_set_id = pydicom.dcmread(io.BytesIO(plan.dicomdir.data)).FileSetID
        assert file_set_id == plan.file_set_id == volume_label_for([study])
        assert iso.pvd.volume_identifier.decode("ascii").strip() == file_set_id
        assert iso.joliet_vd.volume_identifier.decode("utf-16-be").strip() == file_set_id
        iso_names: list[str] = []
        joliet_names: list[str] = []
        for dirname, _, filenames in iso.walk(iso_path="/"):
            iso_names += [f"{dirname.rstrip('/')}/{name}" for name in filenames]
        for dirname, _, filenames in iso.walk(joliet_path="/"):
            joliet_names += [f"{dirname.rstrip('/')}/{name}" for name in filenames]
        assert "/DICOMDIR.;1" in iso_names and "/README.TXT;1" in iso_names
        assert sorted(n.lstrip("/") for n in joliet_names) == zip_names
        assert sorted(n.lstrip("/").removesuffix(";1").rstrip(".") for n in iso_names) == (
            zip_names
        )
        for name in zip_names:
            joliet = io.BytesIO()
            iso.get_file_from_iso_fp(joliet, joliet_path=f"/{name}")
            assert joliet.getvalue() == contents[name], name
        plain = io.BytesIO()
        iso.get_file_from_iso_fp(plain, iso_path="/DICOMDIR.;1")
        assert plain.getvalue() == plan.dicomdir.data
    finally:
        iso.close()


@pytest.mark.peer
def test_dicom3tools_read_the_dicomdir_of_the_cd_image(study, tmp_path):
    dcdirdmp = require_peer("dcdirdmp")
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    target = tmp_path / "study.iso"
    with target.open("wb") as out:
        iso_build(plan, out=out, volume_label=volume_label_for([study]))
    iso = pycdlib.PyCdlib()
    iso.open(str(target))
    root = tmp_path / "disc"
    try:
        for media_file in plan.files:
            path = root / media_file.path
            path.parent.mkdir(parents=True, exist_ok=True)
            iso.get_file_from_iso(str(path), joliet_path=f"/{media_file.path}")
    finally:
        iso.close()
    _assert_dcdirdmp_lists(dcdirdmp, root, plan)


def test_the_zip_is_streamed_while_the_images_are_read(study, monkeypatch):
    storage = storages["default"]
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    opened: list[str] = []
    real_open = storage.open

    def spy(name: str, mode: str = "rb") -> Any:
        opened.append(name)
        return real_open(name, mode)

    monkeypatch.setattr(storage, "open", spy)
    assert zip_size(plan) is not None
    assert opened == []  # knowing the size reads nothing

    stream = zip_stream(plan)
    first = next(stream)
    assert first.startswith(b"PK\x03\x04")
    assert opened == []  # README and DICOMDIR come first, from the plan
    opened_at_each_chunk = [len(opened)]
    for _ in stream:
        opened_at_each_chunk.append(len(opened))
    keys = [f.storage_key for f in plan.studies[0].instances]
    # Each object opened once, in order; then the disc viewer's frames, made last, read the
    # images again (or their renders for the web viewer, where those are stored already).
    assert opened[: len(keys)] == keys
    assert all(key in keys or key.startswith("renders/") for key in opened[len(keys) :])
    # Bytes came out between the objects being opened, not after all of them had been read.
    assert opened_at_each_chunk.count(1) >= 1 and opened_at_each_chunk.index(len(keys)) > 1


def test_a_stored_object_that_changed_size_stops_the_export(study):
    instance = Instance.objects.filter(series__study=study).first()
    assert instance is not None
    Path(storages["default"].path(instance.storage_key)).write_bytes(b"short")
    with pytest.raises(ExportError, match="bytes"):
        export_plan(studies=[study], reports_of=_owner_reports)


def test_a_purged_study_or_nothing_cannot_be_exported(study):
    with pytest.raises(ExportError):
        export_plan(studies=[], reports_of=_owner_reports)
    study.purged_at = timezone.now()
    with pytest.raises(ExportError, match="deleted"):
        export_plan(studies=[study], reports_of=_owner_reports)


def _study_with_empty_values(client: Any, token: str) -> Study:
    # Type 2 in the images, Type 1 in the DICOMDIR records.
    return _upload_study(
        client, token, ct=2, StudyID=None, PatientID=None, StudyTime=None, SeriesNumber=None
    )


def test_missing_directory_values_are_invented_without_touching_the_files(client, bob_token):
    study = _study_with_empty_values(client, bob_token)
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    by_key = {i.storage_key: i for i in Instance.objects.filter(series__study=study)}
    with zipfile.ZipFile(io.BytesIO(_zip_bytes(plan))) as archive:
        for media_file in plan.studies[0].instances:
            content = archive.read(media_file.path)
            assert hashlib.sha256(content).hexdigest() == by_key[media_file.storage_key].sha256


@pytest.mark.peer
def test_a_dicomdir_with_invented_values_validates(client, bob_token, tmp_path):
    dciodvfy = require_peer("dciodvfy")
    plan = export_plan(
        studies=[_study_with_empty_values(client, bob_token)], reports_of=_owner_reports
    )
    root = _extract(_zip_bytes(plan), tmp_path / "export")
    result = _run(dciodvfy, str(root / "DICOMDIR"))
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output


def test_two_studies_of_two_patients_share_one_medium(client, bob_token):
    first = _upload_study(client, bob_token, ct=1)
    second = _upload_study(
        client,
        bob_token,
        ct=1,
        PatientID="OTHER-1",
        PatientName="Other^Patient",
        StudyDate="20240301",
    )
    plan = export_plan(studies=[first, second], reports_of=_owner_reports)
    assert plan.images == 4 and len(plan.studies) == 2
    paths = [f.path for s in plan.studies for f in s.instances]
    assert len(set(paths)) == 4
    assert len({p.split("/")[0] for p in paths}) == 2  # one folder per patient
    data = _zip_bytes(plan)
    assert zip_size(plan) == len(data)
    label = volume_label_for([first, second])
    assert label == plan.file_set_id != volume_label_for([first]) != volume_label_for([second])
    assert label == volume_label_for([second, first])


def test_long_header_values_are_skipped_and_the_files_kept_whole(client, bob_token):
    """An overlay and a private blob before the pixel data are never read into the plan."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("CT_small.dcm", **PATIENT)))
    ds.add_new(0x60000010, "US", 128)
    ds.add_new(0x60000011, "US", 128)
    ds.add_new(0x60003000, "OW", bytes(200_000))
    ds.private_block(0x0009, "RELAY TEST", create=True).add_new(0x01, "OB", bytes(150_000))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert upload(client, buffer.getvalue(), token=bob_token).status_code == 201
    study = Study.objects.get()
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    instance = Instance.objects.get()
    with zipfile.ZipFile(io.BytesIO(_zip_bytes(plan))) as archive:
        content = archive.read(plan.studies[0].instances[0].path)
    assert hashlib.sha256(content).hexdigest() == instance.sha256
    assert len(plan.dicomdir.data) < 5_000


def test_media_kind_follows_the_disc_capacities():
    assert media_kind_for(0) == "CD"
    assert media_kind_for(CD_BYTES) == "CD"
    assert media_kind_for(CD_BYTES + 1) == "DVD"
    assert media_kind_for(DVD_BYTES) == "DVD"
    assert CD_BYTES >= 700 * 1024 * 1024 and DVD_BYTES >= 4_700_000_000
    with pytest.raises(ExportError, match="DVD"):
        media_kind_for(DVD_BYTES + 1)


@pytest.mark.parametrize(
    ("name", "study_date"),
    [
        ("Doe^John", date(2024, 1, 15)),
        ("O'Brien^Mary", date(2024, 1, 15)),
        ("Müller-Lüdenscheidt^José^Q^Dr.", date(2023, 12, 31)),
        ("Yamada^Tarou=山田^太郎", None),
        ("", None),
        ("../../etc;1 *?", None),
    ],
)
def test_the_volume_label_is_legal_and_names_no_patient(krmc, name, study_date):
    """A File-set ID (CS, 16) in ISO 9660 d-characters, with neither name nor date."""
    study = Study(facility=krmc, patient_name=name, study_date=study_date)
    result = volume_label_for([study])
    assert re.fullmatch(r"RELAY_[0-9A-F]{10}", result)
    assert result == volume_label_for([study])
    for word in re.findall(r"[A-Z]{3,}", name.upper()):
        assert word not in result
    if study_date is not None:
        assert f"{study_date:%Y%m%d}" not in result


def test_an_illegal_volume_label_is_refused(study, tmp_path):
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    with (tmp_path / "x.iso").open("wb") as out, pytest.raises(ExportError):
        iso_build(plan, out=out, volume_label="o'brien")


def test_the_plan_of_images_reads_nothing_from_storage(study, monkeypatch, bob: User):
    """The DICOMDIR of image objects is made from the index: planning reads no stored object
    (it only checks each one's size), so a ZIP's first byte does not wait for 300 reads."""
    storage = storages["default"]
    reads: dict[str, int] = {}
    real_open = storage.open

    class Counting(io.RawIOBase):
        def __init__(self, name: str) -> None:
            self._fh = real_open(name, "rb")
            self._name = name
            self.size = self._fh.size

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset: int, whence: int = 0) -> int:
            return self._fh.seek(offset, whence)

        def tell(self) -> int:
            return self._fh.tell()

        def readinto(self, buffer: Any) -> int:
            chunk = self._fh.read(len(buffer))
            buffer[: len(chunk)] = chunk
            reads[self._name] = reads.get(self._name, 0) + len(chunk)
            return len(chunk)

        def close(self) -> None:
            self._fh.close()
            super().close()

    monkeypatch.setattr(storage, "open", lambda name, mode="rb": Counting(name))
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    assert reads == {}
    assert plan.images == Instance.objects.filter(series__study=study).count()


def test_objects_other_than_images_get_their_own_records_from_their_headers(
    client, bob_token, tmp_path
):
    """An RT Dose and a structured report need values only their headers hold (Dose Summation
    Type; Completion and Verification flags): those are read from the stored copies."""
    study = _upload_study(client, bob_token, ct=1)
    extra = {**PATIENT, "StudyInstanceUID": study.study_instance_uid, "StudyDate": "20240115"}
    for name in ("rtdose.dcm", "test-SR.dcm"):
        data = dicom_bytes(name, SeriesInstanceUID=generate_uid(), **extra)
        assert upload(client, data, token=bob_token).status_code == 201
    plan = export_plan(studies=[study], reports_of=_owner_reports)
    root = _extract(_zip_bytes(plan), tmp_path / "export")
    records = pydicom.dcmread(root / "DICOMDIR").DirectoryRecordSequence
    kinds = {r.DirectoryRecordType: r for r in records}
    assert {"IMAGE", "RT DOSE", "SR DOCUMENT"} <= set(kinds)
    assert kinds["RT DOSE"].DoseSummationType == "BEAM"  # as in rtdose.dcm
    assert kinds["SR DOCUMENT"].CompletionFlag in ("PARTIAL", "COMPLETE")
    # The DICOMDIR itself is valid (dciodvfy also checks the SR's own content, which in
    # pydicom's test file is not: only the structure is judged here, on the RT Dose medium).
    dcdirdmp = require_peer("dcdirdmp")
    listing = _run(dcdirdmp, str(root / "DICOMDIR"))
    assert listing.returncode == 0 and "Error" not in listing.stdout + listing.stderr


def test_the_dicomdir_is_built_once_and_again_when_the_study_changes(
    client, bob_token, monkeypatch
):
    import transfers.media.export as export

    study = _upload_study(client, bob_token)
    built: list[int] = []
    real_build = export._dicomdir_build
    monkeypatch.setattr(export, "_dicomdir_build", lambda *a: built.append(1) or real_build(*a))
    first = export_plan(studies=[study], reports_of=_owner_reports)
    second = export_plan(studies=[study], reports_of=_owner_reports)
    assert len(built) == 1
    assert second.dicomdir.data == first.dicomdir.data
    assert [f.path for f in second.studies[0].instances] == [
        f.path for f in first.studies[0].instances
    ]
    # One more image: a different medium, so a new DICOMDIR.
    data = dicom_bytes(
        "CT_small.dcm", StudyInstanceUID=study.study_instance_uid, StudyDate="20240115", **PATIENT
    )
    assert upload(client, data, token=bob_token).status_code == 201
    third = export_plan(studies=[Study.objects.get(pk=study.pk)], reports_of=_owner_reports)
    assert len(built) == 2 and third.images == first.images + 1
