"""The gateway's negotiation as PACS and modalities meet it: retired and private storage classes
accepted like the HTTP API accepts them, and the transfer syntax the sender prefers kept (so it
need not decompress, and private VRs survive)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from django.core.files.storage import storages
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)
from pynetdicom import AE

from bench.servers import OrthancServer
from portal.models import AuditAction, AuditEvent, Facility
from tests.helpers import dicom_bytes, gateway_allow, gateway_running, require_peer
from tests.transfers.dicom.test_gateway import _run, _storescu
from transfers.models import Instance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
# Retired ultrasound (single and multi-frame), nuclear medicine and X-ray biplane storage, and
# Siemens' CSA Non-Image: an Orthanc send of a real study stopped at the first of these.
OLD_AND_PRIVATE = [
    "1.2.840.10008.5.1.4.1.1.6",
    "1.2.840.10008.5.1.4.1.1.3",
    "1.2.840.10008.5.1.4.1.1.5",
    "1.2.840.10008.5.1.4.1.1.12.3",
    "1.3.12.2.1107.5.9.1",
]


@pytest.fixture
def gateway(krmc: Facility) -> Iterator[int]:
    gateway_allow(krmc, "PACS1 PYNETDICOM ORTHANC")
    with gateway_running() as port:
        yield port


def _orthanc_sends(port: int, files: list[bytes]) -> dict[str, object]:
    """Orthanc, as a facility's PACS, sends these instances to the gateway (C-STORE SCU)."""
    config = {"DicomAet": "ORTHANC", "DicomModalities": {"relay": ["KRMC", "127.0.0.1", port]}}
    with OrthancServer(extra_config=config) as orthanc:
        ids = [
            httpx.post(f"{orthanc.base_url}/instances", content=data, timeout=30).json()["ID"]
            for data in files
        ]
        answer = httpx.post(
            f"{orthanc.base_url}/modalities/relay/store",
            json={"Resources": ids, "Synchronous": True},
            timeout=60,
        )
    return {"status": answer.status_code, "body": answer.text}


def test_retired_and_private_storage_classes_are_stored(gateway: int) -> None:
    files = [dicom_bytes("CT_small.dcm", SOPClassUID=sop_class) for sop_class in OLD_AND_PRIVATE]

    sent = _orthanc_sends(gateway, files)

    assert sent["status"] == 200, sent
    stored = set(Instance.objects.values_list("sop_class_uid", flat=True))
    assert stored == set(OLD_AND_PRIVATE)


def test_extra_private_classes_come_from_settings(krmc: Facility, settings: Any) -> None:
    private = "1.2.840.113619.4.27"  # a GE private storage class
    settings.DICOM_GATEWAY_EXTRA_SOP_CLASSES = [private]
    gateway_allow(krmc, "ORTHANC")
    with gateway_running() as port:
        sent = _orthanc_sends(port, [dicom_bytes("CT_small.dcm", SOPClassUID=private)])
    assert sent["status"] == 200, sent
    assert Instance.objects.get().sop_class_uid == private


def _accepted(port: int, proposed: list[str]) -> str:
    """The transfer syntax the gateway accepts from one context proposing `proposed`."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CT_IMAGE, proposed)
    assoc = ae.associate("127.0.0.1", port, ae_title="KRMC")
    assert assoc.is_established
    try:
        (context,) = assoc.accepted_contexts
        return str(context.transfer_syntax[0])
    finally:
        assoc.release()


def test_the_senders_first_choice_is_accepted(gateway: int) -> None:
    assert _accepted(gateway, [JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]) == (
        JPEGLSLossless
    )
    assert _accepted(gateway, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) == (
        ExplicitVRLittleEndian
    )
    assert _accepted(gateway, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]) == (
        ImplicitVRLittleEndian
    )


def test_storescu_combining_syntaxes_keeps_jpeg_2000_as_sent(gateway: int, tmp_path: Path) -> None:
    """storescu +C offers the file's own syntax and the uncompressed ones in one context; dcmtk
    cannot decompress JPEG 2000, so picking an uncompressed one made the send fail."""
    path = tmp_path / "j2k.dcm"
    path.write_bytes(dicom_bytes("MR_small_jp2klossless.dcm"))

    storescu = require_peer("storescu")
    # -xv -R +C: one context per class, proposing [JPEG 2000 lossless, explicit, big, implicit].
    result = _run(
        storescu, "-xv", "-R", "+C", "-aet", "PACS1", "-aec", "KRMC", "127.0.0.1", str(gateway),
        str(path),
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    instance = Instance.objects.get()
    assert instance.transfer_syntax_uid == JPEG2000Lossless
    assert instance.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID


def test_the_stored_file_meta_names_the_sender_and_a_resend_by_another_title_is_no_conflict(
    gateway: int, tmp_path: Path, krmc: Facility
) -> None:
    """PS3.10 7.1: Source Application Entity Title (0002,0016) is the AE title of the sender.
    Written by the gateway, it must not turn the same instance sent again by another of the
    facility's AE titles into a conflict; other data under the same UID still is one."""
    gateway_allow(krmc, "PACS1 ROUTER")
    path = tmp_path / "ct.dcm"
    path.write_bytes(dicom_bytes("CT_small.dcm"))

    first = _storescu(gateway, [path], calling="PACS1")
    again = _storescu(gateway, [path], calling="ROUTER")

    assert first.returncode == again.returncode == 0, again.stdout + again.stderr
    instance = Instance.objects.get()
    with storages["default"].open(instance.storage_key) as f:
        stored = pydicom.dcmread(f)
    assert stored.file_meta.SourceApplicationEntityTitle == "PACS1"
    # dcmtk reads the stored copy and its meta.
    (tmp_path / "stored.dcm").write_bytes(storages["default"].open(instance.storage_key).read())
    dump = _run(require_peer("dcmdump"), "-M", str(tmp_path / "stored.dcm"))
    assert dump.returncode == 0 and "SourceApplicationEntityTitle" in dump.stdout, dump.stderr
    duplicate = AuditEvent.objects.filter(action=AuditAction.UPLOAD).order_by("id").last()
    assert duplicate is not None and duplicate.detail["status"] == "duplicate"
    # Another data set under the same UID is still refused.
    other = tmp_path / "other.dcm"
    other.write_bytes(
        dicom_bytes("CT_small.dcm", SOPInstanceUID=stored.SOPInstanceUID, PatientID="OTHER")
    )
    refused = _storescu(gateway, [other], calling="ROUTER")
    output = refused.stdout + refused.stderr
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in output, output
    assert Instance.objects.count() == 1
