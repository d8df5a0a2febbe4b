"""What is stored is still valid DICOM to other tools: dcmtk reads every stored copy."""

from __future__ import annotations

import subprocess

import pytest
from django.core.files.storage import storages

from tests.helpers import dicom_bytes, read_testdata, require_peer, upload
from transfers.models import Instance

pytestmark = pytest.mark.django_db


@pytest.mark.peer
def test_dcmtk_reads_the_stored_copies(client, bob_token):
    dcmdump = require_peer("dcmdump")
    hidden = bytearray(dicom_bytes("CT_small.dcm", PatientName="PREAMBLE^TEST"))
    hidden[:4] = b"MZ\x90\x00"
    for data in (bytes(hidden), read_testdata("MR_small_RLE.dcm"), read_testdata("rtdose.dcm")):
        assert upload(client, data, token=bob_token).status_code == 201
    storage = storages["default"]
    for instance in Instance.objects.all():
        result = subprocess.run(
            [dcmdump, "-q", storage.path(instance.storage_key)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert instance.sop_instance_uid in result.stdout
    assert (
        "PREAMBLE^TEST"
        in subprocess.run(
            [
                dcmdump,
                "-q",
                storage.path(
                    Instance.objects.get(series__study__patient_name="PREAMBLE^TEST").storage_key
                ),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
