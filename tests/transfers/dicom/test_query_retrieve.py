"""Query/retrieve on the gateway against real peers: dcmtk's findscu, getscu and movescu, and
Orthanc querying and retrieving from Relay through its REST API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from django.core.files.storage import storages
from django.utils import timezone
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bench.servers import OrthancServer
from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import dicom_bytes, gateway_allow, gateway_running, require_peer
from tests.transfers.dicom.test_gateway import _free_port, _run
from transfers.ingest import STORED, instance_ingest
from transfers.models import Instance, PacsDestination, Share, ShareEvent, ShareEventKind, ShareKind

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]

CALLERS = "FINDSCU GETSCU MOVESCU ORTHANC PYNETDICOM"


@dataclass
class Studies:
    own: str  # KRMC's: two CT images and one JPEG 2000 MR
    own_sops: list[str]
    jp2k_sop: str
    other: str  # GFC's, not shared
    shared: str  # GFC's, shared with KRMC with the import right
    shared_view_only: str  # GFC's, shared with KRMC without it


def ingest(facility: Facility, data: bytes) -> None:
    result = instance_ingest(
        facility=facility, user=None, chunks=[data], expected_size=len(data), source="test"
    )
    assert result.status == STORED, result.reason


def _study(facility: Facility, files: list[tuple[str, dict[str, Any]]], **common: Any) -> str:
    uid = generate_uid()
    for name, changes in files:
        ingest(facility, dicom_bytes(name, StudyInstanceUID=uid, **common, **changes))
    return uid


def _share(gfc: Facility, krmc: Facility, study_uid: str, *, can_import: bool) -> Share:
    owner = User.objects.create_user(email=f"{generate_uid()[-8:]}@gfc.test", password="x-x-x-x-x")
    share = Share.objects.create(
        facility=gfc,
        created_by=owner,
        kind=ShareKind.FACILITY,
        recipient_facility=krmc,
        can_import=can_import,
        expires_at=timezone.now() + timedelta(days=7),
    )
    share.studies.add(*gfc.studies.filter(study_instance_uid=study_uid))
    return share


@pytest.fixture
def studies(krmc: Facility, gfc: Facility) -> Studies:
    series_ct, series_mr = generate_uid(), generate_uid()
    own_sops = [str(generate_uid()) for _ in range(3)]
    own = _study(
        krmc,
        [
            ("CT_small.dcm", {"SeriesInstanceUID": series_ct, "SOPInstanceUID": own_sops[0]}),
            ("CT_small.dcm", {"SeriesInstanceUID": series_ct, "SOPInstanceUID": own_sops[1]}),
            (
                "MR_small_jp2klossless.dcm",
                {"SeriesInstanceUID": series_mr, "SOPInstanceUID": own_sops[2]},
            ),
        ],
        PatientName="DOE^JOHN",
        PatientID="P-DOE",
        StudyDate="20240115",
        AccessionNumber="ACC1",
    )
    other = _study(
        gfc,
        [("CT_small.dcm", {})],
        PatientName="SECRET^GFC",
        PatientID="P-GFC",
        StudyDate="20240116",
    )
    shared = _study(
        gfc,
        [("CT_small.dcm", {})],
        PatientName="MÜLLER^JÖRG",
        PatientID="P-MUL",
        StudyDate="20230301",
        SpecificCharacterSet="ISO_IR 192",
    )
    view_only = _study(gfc, [("CT_small.dcm", {})], PatientName="VIEW^ONLY", PatientID="P-VIEW")
    _share(gfc, krmc, shared, can_import=True)
    _share(gfc, krmc, view_only, can_import=False)
    return Studies(own, own_sops, own_sops[2], other, shared, view_only)


@pytest.fixture
def gateway(krmc: Facility) -> Iterator[int]:
    gateway_allow(krmc, CALLERS)
    with gateway_running() as port:
        yield port


def findscu(port: int, out: Path, *keys: str, model: str = "-S") -> list[pydicom.Dataset]:
    out.mkdir(exist_ok=True)
    result = _run(
        require_peer("findscu"), "-aet", "FINDSCU", "-aec", "KRMC", model, "-X", "-od", str(out),
        *[arg for key in keys for arg in ("-k", key)], "127.0.0.1", str(port),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def test_findscu_finds_a_study_by_name_and_date_range(
    gateway: int, studies: Studies, tmp_path: Path
) -> None:
    answers = findscu(
        gateway, tmp_path / "r",
        "QueryRetrieveLevel=STUDY", "PatientName=DOE*", "StudyDate=20240101-20241231",
        "StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries", "AccessionNumber", "PatientID", "InstanceAvailability",
    )  # fmt: skip
    assert len(answers) == 1
    answer = answers[0]
    assert answer.StudyInstanceUID == studies.own
    assert answer.QueryRetrieveLevel == "STUDY"
    assert answer.RetrieveAETitle == "KRMC"
    assert sorted(answer.ModalitiesInStudy) == ["CT", "MR"]
    assert int(answer.NumberOfStudyRelatedInstances) == 3
    assert int(answer.NumberOfStudyRelatedSeries) == 2
    assert answer.AccessionNumber == "ACC1"
    assert answer.PatientID == "P-DOE"
    assert answer.InstanceAvailability == "ONLINE"
    # A date range that leaves it out finds nothing.
    assert (
        findscu(
            gateway,
            tmp_path / "none",
            "QueryRetrieveLevel=STUDY",
            "StudyDate=-20231231",
            "PatientName=DOE*",
            "StudyInstanceUID",
        )  # fmt: skip
        == []
    )


def test_a_facility_finds_its_own_and_its_import_shares_only(
    gateway: int, studies: Studies, tmp_path: Path
) -> None:
    answers = findscu(
        gateway, tmp_path / "r",
        "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "StudyDate",
    )  # fmt: skip
    found = {a.StudyInstanceUID: a for a in answers}
    # Another facility's study is not found, nor one shared without the import right.
    assert set(found) == {studies.own, studies.shared}
    shared = found[studies.shared]
    assert shared.SpecificCharacterSet == "ISO_IR 192"
    assert str(shared.PatientName) == "MÜLLER^JÖRG"
    assert shared.StudyDate == "20230301"
    # A list of UIDs: only the visible ones answer.
    listed = findscu(
        gateway, tmp_path / "list",
        "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={studies.own}\\{studies.other}",
    )  # fmt: skip
    assert [a.StudyInstanceUID for a in listed] == [studies.own]
    # Every query audited, with counts and key names, never the values.
    events = AuditEvent.objects.filter(action=AuditAction.DICOM_QUERY).order_by("pk")
    assert [e.detail["matches"] for e in events] == [2, 1]
    assert events[0].detail["level"] == "STUDY"
    assert events[0].detail["calling_ae"] == "FINDSCU"
    assert "StudyInstanceUID" in events[1].detail["keys"]
    assert studies.own not in json.dumps(events[1].detail)


def test_findscu_at_series_and_image_level(gateway: int, studies: Studies, tmp_path: Path) -> None:
    series = findscu(
        gateway, tmp_path / "s",
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={studies.own}", "SeriesInstanceUID",
        "Modality", "NumberOfSeriesRelatedInstances",
        # Orthanc sends these at series level: not matched on.
        "PatientID=SOMEONE-ELSE", "AccessionNumber",
    )  # fmt: skip
    by_modality = {s.Modality: s for s in series}
    assert set(by_modality) == {"CT", "MR"}
    assert int(by_modality["CT"].NumberOfSeriesRelatedInstances) == 2
    assert all(s.QueryRetrieveLevel == "SERIES" for s in series)

    mr_series = by_modality["MR"].SeriesInstanceUID
    images = findscu(
        gateway, tmp_path / "i",
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={studies.own}",
        f"SeriesInstanceUID={mr_series}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
    )  # fmt: skip
    assert [i.SOPInstanceUID for i in images] == [studies.jp2k_sop]
    assert (
        images[0].SOPClassUID
        == pydicom.dcmread(str(get_testdata_file("MR_small_jp2klossless.dcm"))).SOPClassUID
    )
    # Wildcards on a UID are not wildcards: nothing matches "1.2*" literally.
    none = findscu(
        gateway, tmp_path / "w",
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={studies.own}", "Modality=C?",
    )  # fmt: skip
    assert [s.Modality for s in none] == ["CT"]


def test_findscu_patient_root(gateway: int, studies: Studies, tmp_path: Path) -> None:
    patients = findscu(
        gateway, tmp_path / "p",
        "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances",
        model="-P",
    )  # fmt: skip
    by_id = {p.PatientID: p for p in patients}
    assert set(by_id) == {"P-DOE", "P-MUL"}
    assert int(by_id["P-DOE"].NumberOfPatientRelatedInstances) == 3
    assert int(by_id["P-DOE"].NumberOfPatientRelatedStudies) == 1
    studies_of = findscu(
        gateway, tmp_path / "ps",
        "QueryRetrieveLevel=STUDY", "PatientID=P-DOE", "StudyInstanceUID", model="-P",
    )  # fmt: skip
    assert [s.StudyInstanceUID for s in studies_of] == [studies.own]


def test_patient_level_is_refused_in_study_root(gateway: int, studies: Studies) -> None:
    result = _run(
        require_peer("findscu"), "-v", "-aet", "FINDSCU", "-aec", "KRMC", "-S",
        "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID", "127.0.0.1", str(gateway),
    )  # fmt: skip
    # 0xA900, "identifier does not match SOP class", in dcmtk's words.
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr


def _pixels_equal(received: Path, source_name: str) -> None:
    got = pydicom.dcmread(received)
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    expected = pydicom.dcmread(str(get_testdata_file(source_name))).pixel_array
    assert np.array_equal(got.pixel_array, expected)


def test_getscu_retrieves_a_study_decompressing_what_it_cannot_take(
    gateway: int, studies: Studies, tmp_path: Path
) -> None:
    out = tmp_path / "got"
    out.mkdir()
    result = _run(
        require_peer("getscu"), "-aet", "GETSCU", "-aec", "KRMC", "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies.own}",
        "-od", str(out), "127.0.0.1", str(gateway),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    assert set(received) == set(studies.own_sops)
    # getscu proposes uncompressed syntaxes only: the JPEG 2000 image came decompressed,
    # pixel for pixel what pydicom decodes, under its own SOP Instance UID.
    _pixels_equal(received[studies.jp2k_sop], "MR_small_jp2klossless.dcm")
    event = AuditEvent.objects.get(action=AuditAction.DICOM_RETRIEVE)
    assert event.study_instance_uid == studies.own
    assert event.detail["via"] == "C-GET"
    assert (event.detail["sent"], event.detail["failed"]) == (3, 0)


def test_a_damaged_stored_copy_fails_alone(gateway: int, studies: Studies, tmp_path: Path) -> None:
    damaged = Instance.objects.get(sop_instance_uid=studies.own_sops[0])
    path = Path(storages["default"].path(damaged.storage_key))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "got"
    out.mkdir()
    _run(
        require_peer("getscu"), "-aet", "GETSCU", "-aec", "KRMC", "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies.own}",
        "-od", str(out), "127.0.0.1", str(gateway),
    )  # fmt: skip
    received = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert received == set(studies.own_sops[1:])
    failure = AuditEvent.objects.get(action=AuditAction.INTEGRITY_FAILED)
    assert failure.detail["sop_instance_uid"] == studies.own_sops[0]
    event = AuditEvent.objects.get(action=AuditAction.DICOM_RETRIEVE)
    assert (event.detail["sent"], event.detail["failed"]) == (2, 1)


def test_getscu_gets_nothing_of_another_facility(
    gateway: int, studies: Studies, tmp_path: Path
) -> None:
    out = tmp_path / "got"
    out.mkdir()
    for uid in (studies.other, studies.shared_view_only):
        _run(
            require_peer("getscu"), "-aet", "GETSCU", "-aec", "KRMC", "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
            "-od", str(out), "127.0.0.1", str(gateway),
        )  # fmt: skip
    assert list(out.iterdir()) == []


def _movescu(port: int, out: Path, *, destination: str, study: str, scp_port: int) -> Any:
    out.mkdir(exist_ok=True)
    return _run(
        require_peer("movescu"), "-v", "-aet", "MOVESCU", "-aec", "KRMC", "-aem", destination,
        "--port", str(scp_port), "-S", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={study}", "-od", str(out), "127.0.0.1", str(port),
    )  # fmt: skip


def test_movescu_to_a_registered_destination(
    gateway: int, studies: Studies, krmc: Facility, tmp_path: Path
) -> None:
    scp_port = _free_port()
    PacsDestination.objects.create(
        facility=krmc, name="Reading room", ae_title="MOVESCU", host="127.0.0.1", port=scp_port
    )
    result = _movescu(
        gateway, tmp_path / "own", destination="MOVESCU", study=studies.own, scp_port=scp_port
    )
    assert result.returncode == 0, result.stdout + result.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in (tmp_path / "own").iterdir()}
    assert set(received) == set(studies.own_sops)
    _pixels_equal(received[studies.jp2k_sop], "MR_small_jp2klossless.dcm")

    # A study shared with the import right moves too, and the share's timeline says so.
    result = _movescu(
        gateway, tmp_path / "shared", destination="MOVESCU", study=studies.shared,
        scp_port=scp_port,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((tmp_path / "shared").iterdir())) == 1
    events = AuditEvent.objects.filter(action=AuditAction.DICOM_RETRIEVE).order_by("pk")
    assert [(e.study_instance_uid, e.detail["sent"]) for e in events] == [
        (studies.own, 3),
        (studies.shared, 1),
    ]
    assert "Reading room" in events[0].detail["destination"]
    assert "share" in events[1].detail
    imported = ShareEvent.objects.get(kind=ShareEventKind.IMPORTED)
    assert imported.detail.startswith("1 of 1 images")


def test_movescu_to_an_unregistered_destination_is_refused_and_audited(
    gateway: int, studies: Studies, tmp_path: Path
) -> None:
    scp_port = _free_port()
    result = _movescu(
        gateway, tmp_path / "x", destination="ELSEWHERE", study=studies.own, scp_port=scp_port
    )
    # 0xA801 in dcmtk's words.
    assert "Refused: MoveDestinationUnknown" in result.stdout + result.stderr
    assert list((tmp_path / "x").iterdir()) == []
    event = AuditEvent.objects.get(action=AuditAction.DICOM_RETRIEVE)
    assert event.outcome == "failure"
    assert event.detail["destination"] == "ELSEWHERE"


def test_movescu_to_a_destination_that_does_not_answer_is_audited(
    gateway: int, studies: Studies, krmc: Facility, tmp_path: Path
) -> None:
    PacsDestination.objects.create(
        facility=krmc, name="Switched off", ae_title="OFF", host="127.0.0.1", port=_free_port()
    )
    result = _movescu(
        gateway, tmp_path / "x", destination="OFF", study=studies.own, scp_port=_free_port()
    )
    assert "Refused: MoveDestinationUnknown" in result.stdout + result.stderr
    event = AuditEvent.objects.get(action=AuditAction.DICOM_RETRIEVE)
    assert event.outcome == "failure"
    assert "did not accept" in event.detail["reason"]


def test_orthanc_queries_and_retrieves_from_relay(
    gateway: int, studies: Studies, krmc: Facility
) -> None:
    config: dict[str, object] = {
        "DicomAet": "ORTHANC",
        "DicomModalities": {"relay": ["KRMC", "127.0.0.1", gateway]},
    }
    with OrthancServer(extra_config=config) as orthanc:
        PacsDestination.objects.create(
            facility=krmc, name="Orthanc", ae_title="ORTHANC", host="127.0.0.1",
            port=orthanc.dicom_port,
        )  # fmt: skip
        base = orthanc.base_url
        query = httpx.post(
            f"{base}/modalities/relay/query",
            json={"Level": "Study", "Query": {"PatientName": "DOE*", "StudyDate": "20240101-"}},
            timeout=30,
        )
        assert query.status_code == 200, query.text
        path = query.json()["Path"]
        answers = httpx.get(f"{base}{path}/answers?expand&simplify", timeout=30).json()
        assert [a["StudyInstanceUID"] for a in answers] == [studies.own]
        # Orthanc's series query (with its PatientID and AccessionNumber) on the same study.
        series = httpx.post(
            f"{base}/modalities/relay/query",
            json={"Level": "Series", "Query": {"StudyInstanceUID": studies.own}},
            timeout=30,
        ).json()
        series_answers = httpx.get(f"{base}{series['Path']}/answers?expand&simplify").json()
        assert len(series_answers) == 2

        moved = httpx.post(
            f"{base}{path}/retrieve",
            json={"TargetAet": "ORTHANC", "Synchronous": True},
            timeout=120,
        )
        assert moved.status_code == 200, moved.text
        stored = httpx.get(f"{base}/instances?expand", timeout=30).json()
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == set(studies.own_sops)
