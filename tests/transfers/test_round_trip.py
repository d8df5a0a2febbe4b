"""The PACS and media round trip of the demo, end to end with real peers.

Great Falls' PACS (dcmtk's storescu, calling AE GFC_PACS) sends a CT to the gateway as GFC; the
demo's routing rule shares it with Kalispell once complete; a Kalispell reader pushes it into
Kalispell's PACS (an Orthanc) and downloads it as a ZIP and as a CD image that dcmtk and
dicom3tools read; a St. Luke sender uploads a patient's disc and reconciles the patient.
"""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pycdlib
import pydicom
import pytest
from django.core.management import call_command
from pydicom.fileset import FileSet

from bench.servers import OrthancServer, free_port
from portal.models import Facility, User
from relay.management.commands.seed_demo import demo_ct_series
from tests.helpers import client_for, dicom_bytes, require_peer
from tests.transfers.dicom.test_gateway import _storescu
from transfers.dicom.gateway import Gateway
from transfers.models import (
    ExportStatus,
    MediaExport,
    PacsDestination,
    Push,
    PushStatus,
    ShareEvent,
    ShareEventKind,
    Study,
    StudyStatus,
)
from transfers.tasks import studies_complete_quiet

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]

GFC_STUDY = "1.2.826.0.1.3680043.8.498.4242"


def _run(*args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_the_demo_round_trip(
    tmp_path: Path, settings: Any, django_capture_on_commit_callbacks: Any, live_server: Any
) -> None:
    settings.VAR_DIR = tmp_path
    call_command("seed_demo", stdout=io.StringIO())
    dciodvfy, dcdirdmp, dcmdump = (require_peer(p) for p in ("dciodvfy", "dcdirdmp", "dcmdump"))
    require_peer("Orthanc")

    # 1. Great Falls' PACS sends a CT to the gateway under Great Falls' AE title.
    pacs_out = tmp_path / "gfc-pacs"
    pacs_out.mkdir()
    for n, data in enumerate(demo_ct_series(6)):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID = GFC_STUDY
        ds.PatientName, ds.PatientID = "FALLS^GREAT", "GF-77"
        ds.save_as(pacs_out / f"{n}.dcm", enforce_file_format=True)
    server = Gateway().start(host="127.0.0.1", port=(port := free_port()))
    try:
        sent = _storescu(port, sorted(pacs_out.iterdir()), called="GFC_RELAY", calling="GFC_PACS")
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        server.shutdown()
    study = Study.objects.get(study_instance_uid=GFC_STUDY)
    assert (study.facility.slug, study.num_instances) == ("gfc", 6)

    # 2. Complete after the quiet period: the demo rule shares it with Kalispell.
    settings.RELAY_STUDY_QUIET_SECONDS = 0
    studies_complete_quiet()
    study.refresh_from_db()
    assert study.status == StudyStatus.COMPLETE
    share = study.shares.get()
    assert share.recipient_facility == Facility.objects.get(slug="krmc")
    reader = User.objects.get(email="reader@krmc.example")
    client = client_for(reader)
    assert client.get(f"/studies/{study.uuid}/").status_code == 200

    # 3. The Kalispell reader pushes it into Kalispell's PACS (an Orthanc).
    with OrthancServer() as orthanc:
        PacsDestination.objects.filter(facility__slug="krmc").update(
            ae_title="ORTHANC", port=orthanc.dicom_port
        )
        destination = PacsDestination.objects.get(facility__slug="krmc")
        with django_capture_on_commit_callbacks(execute=True):
            client.post(
                f"/studies/{study.uuid}/pacs/",
                {"action": "push", "destination": str(destination.uuid)},
            )
        push = Push.objects.get()
        assert (push.status, push.sent) == (PushStatus.DONE, 6)
        (orthanc_study,) = httpx.get(f"{orthanc.base_url}/studies").json()
        instances = httpx.get(f"{orthanc.base_url}/studies/{orthanc_study}/instances").json()
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == {
            pydicom.dcmread(p).SOPInstanceUID for p in pacs_out.iterdir()
        }
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.IMPORTED).exists()

    # 4. ... and downloads it as a ZIP that dicom3tools and dcmtk read.
    response = client.get(f"/studies/{study.uuid}/download/")
    media = tmp_path / "zip"
    zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).extractall(media)
    _check_media(media, dciodvfy=dciodvfy, dcdirdmp=dcdirdmp, dcmdump=dcmdump)

    # 5. ... and as a CD image.
    with django_capture_on_commit_callbacks(execute=True):
        client.post(f"/studies/{study.uuid}/cd/")
    export = MediaExport.objects.get()
    assert export.status == ExportStatus.READY
    body = client.get(f"/studies/{study.uuid}/cd/{export.uuid}/download/")
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(b"".join(body.streaming_content)))
    cd = tmp_path / "cd"
    for path in _iso_files(iso, "/"):
        target = cd / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            iso.get_file_from_iso_fp(out, joliet_path=path)
    iso.close()
    _check_media(cd, dciodvfy=dciodvfy, dcdirdmp=dcdirdmp, dcmdump=dcmdump)

    # 6. A St. Luke sender uploads a patient's disc and reconciles the patient.
    _disc_reconcile(tmp_path, django_capture_on_commit_callbacks, live_server.url)


def _iso_files(iso: pycdlib.PyCdlib, folder: str) -> list[str]:
    files = []
    for child in iso.list_children(joliet_path=folder):
        name = child.file_identifier().decode("utf-16-be")
        if child.is_dot() or child.is_dotdot():
            continue
        path = f"{folder.rstrip('/')}/{name}"
        files.extend(_iso_files(iso, path) if child.is_dir() else [path])
    return files


def _check_media(folder: Path, *, dciodvfy: str, dcdirdmp: str, dcmdump: str) -> None:
    dicomdir = folder / "DICOMDIR"
    verify = subprocess.run([dciodvfy, str(dicomdir)], capture_output=True, text=True, check=False)
    errors = [
        line for line in (verify.stdout + verify.stderr).splitlines() if line.startswith("Error")
    ]
    assert not errors, errors
    listing = _run(dcdirdmp, str(dicomdir))
    images = [p for p in folder.rglob("IM*") if p.is_file()]
    assert len(images) == 6
    for image in images:
        assert str(image.relative_to(folder)).replace("/", "\\") in listing
        _run(dcmdump, str(image))
    assert (folder / "README.TXT").exists()


def _disc_reconcile(tmp_path: Path, capture: Any, server_url: str) -> None:
    """A disc made by another hospital, with its own patient ID, sent with `relay send`."""
    disc = tmp_path / "disc"
    fileset = FileSet()
    for _ in range(2):
        ds = pydicom.dcmread(
            io.BytesIO(
                dicom_bytes(
                    "CT_small.dcm",
                    PatientID="ELSEWHERE-9",
                    PatientName="DISC^PATIENT",
                    StudyInstanceUID="1.2.826.0.1.3680043.8.498.99",
                )
            )
        )
        fileset.add(ds)
    fileset.write(disc)
    sender = User.objects.get(email="sender@stluke.example")
    from portal.models import ApiToken
    from relay_client.cli import main as relay

    _, token = ApiToken.issue(user=sender, name="disc")
    code = relay(["send", str(disc), "--server", server_url, "--token", token, "--retry-wait", "0"])
    assert code == 0
    study = Study.objects.get(study_instance_uid="1.2.826.0.1.3680043.8.498.99")
    assert study.facility.slug == "stluke" and study.patient_id == "ELSEWHERE-9"
    with capture(execute=True):
        response = client_for(sender).post(
            f"/studies/{study.uuid}/reconcile/",
            {"patient_id": "SL-1001", "patient_name": "DISC^PATIENT", "issuer": "STLUKE"},
        )
    assert response.status_code == 302
    study.refresh_from_db()
    assert (study.patient_id, study.issuer_of_patient_id) == ("SL-1001", "STLUKE")
