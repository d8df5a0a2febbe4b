"""Fixtures of the DICOMweb tests: a study of four series in the syntaxes peers meet (explicit
little endian, JPEG 2000, RLE with two frames, uncompressed with two frames), uploaded through
the API as a sender would, and its source files kept for comparison."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pydicom
import pytest
from django.test import Client
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bench.servers import DICOMWEB_PLUGIN
from portal.models import ApiToken, Facility, TokenAccess, User
from tests.helpers import peer_missing, require_peer, upload
from transfers.models import Study

SOURCES = (
    # (pydicom test file, series number)
    ("CT_small.dcm", 1),
    ("MR_small_jp2klossless.dcm", 2),
    ("SC_rgb_rle_2frame.dcm", 3),
    ("SC_rgb_2frame.dcm", 4),
)


@dataclass
class UploadedStudy:
    study: Study
    uid: str
    # SOP Instance UID -> the file's bytes as uploaded
    files: dict[str, bytes] = field(default_factory=dict)
    # SOP Instance UID -> (Series Instance UID, pydicom test file)
    where: dict[str, tuple[str, str]] = field(default_factory=dict)

    def sop_of(self, name: str) -> str:
        return next(sop for sop, (_, source) in self.where.items() if source == name)

    def series_of(self, name: str) -> str:
        return self.where[self.sop_of(name)][0]


def study_upload(
    client: Client,
    token: str,
    *,
    facility: str = "krmc",
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID-1",
    study_date: str = "20240315",
    accession: str = "ACC1",
    sources: tuple[tuple[str, int], ...] = SOURCES,
) -> UploadedStudy:
    study_uid = generate_uid()
    series_uids = {number: generate_uid() for _, number in sources}
    result = UploadedStudy(study=None, uid=study_uid)  # type: ignore[arg-type]
    for name, number in sources:
        ds = pydicom.dcmread(str(get_testdata_file(name)))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids[number]
        ds.SeriesNumber = number
        ds.InstanceNumber = 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.StudyDate = study_date
        ds.AccessionNumber = accession
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        answer = upload(client, data, token=token, facility=facility, filename=f"{name}")
        assert answer.status_code == 201, answer.content
        result.files[ds.SOPInstanceUID] = data
        result.where[ds.SOPInstanceUID] = (ds.SeriesInstanceUID, name)
    result.study = Study.objects.get(study_instance_uid=study_uid)
    return result


@pytest.fixture
def read_token(bob: User, krmc: Facility) -> str:
    """A read-only token of bob's, for krmc."""
    return ApiToken.issue(user=bob, name="dicomweb", facility=krmc, access=TokenAccess.READ)[1]


@pytest.fixture
def ct_study(client: Client, bob_token: str) -> UploadedStudy:
    return study_upload(client, bob_token)


@pytest.fixture(autouse=True)
def _site_url(request: Any, settings: Any) -> None:
    """Relay's absolute URLs (RetrieveURL, BulkDataURI) are on SITE_URL: the live server's."""
    if "live_server" in request.fixturenames:
        settings.SITE_URL = request.getfixturevalue("live_server").url
    else:
        settings.SITE_URL = "http://testserver"


def bearer(token: str) -> dict[str, Any]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def orthanc_dicomweb_required() -> None:
    """Orthanc and its DICOMweb plugin, or the test fails in CI (skips elsewhere, saying why)."""
    require_peer("Orthanc")
    if not DICOMWEB_PLUGIN.exists():
        peer_missing("Orthanc's DICOMweb plugin is missing (Debian package orthanc-dicomweb)")
