"""Orthanc's DICOMweb plugin as the client: Orthanc is configured with Relay as a DICOMweb server
(an API token in its headers), searches it, and retrieves a study from it, after which Orthanc
holds the same instances, byte for byte as Relay stores them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from django.core.files.storage import storages

from bench.servers import OrthancServer, dicomweb_config
from transfers.models import Instance

from .conftest import UploadedStudy, orthanc_dicomweb_required

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]


def test_orthanc_retrieves_a_study_from_relay(
    live_server: Any, read_token: str, ct_study: UploadedStudy
) -> None:
    orthanc_dicomweb_required()
    config = dicomweb_config(f"{live_server.url}/dicom-web/", read_token)
    with OrthancServer(extra_config=config) as orthanc:
        base = orthanc.base_url
        found = httpx.post(
            f"{base}/dicom-web/servers/relay/qido",
            json={"Uri": "/studies", "Arguments": {"PatientID": "PID*"}},
            timeout=60,
        )
        assert found.status_code == 200, found.text
        # Orthanc's own rendering of the answers: each value as a string.
        assert [s["0020000D"]["Value"] for s in found.json()] == [ct_study.uid]
        assert found.json()[0]["00100010"]["Value"] == "DOE^JANE"

        retrieved = httpx.post(
            f"{base}/dicom-web/servers/relay/retrieve",
            json={"Resources": [{"Study": ct_study.uid}]},
            timeout=120,
        )
        assert retrieved.status_code == 200, retrieved.text

        studies = httpx.get(f"{base}/studies", timeout=10).json()
        assert len(studies) == 1
        instances = httpx.get(f"{base}/studies/{studies[0]}/instances", timeout=10).json()
        assert len(instances) == 4
        for item in instances:
            sop = item["MainDicomTags"]["SOPInstanceUID"]
            held = httpx.get(f"{base}/instances/{item['ID']}/file", timeout=10).content
            stored = Instance.objects.get(sop_instance_uid=sop)
            with storages["default"].open(stored.storage_key) as f:
                assert held == f.read(), sop
