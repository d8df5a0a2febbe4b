"""Storage Commitment Push Model on the gateway, with a pynetdicom SCU (dcmtk has none): a
sending PACS learns which instances Relay safely keeps."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from portal.models import AuditAction, AuditEvent, Facility
from tests.helpers import dicom_bytes, gateway_allow, gateway_running
from tests.transfers.dicom.test_gateway import _free_port
from tests.transfers.dicom.test_query_retrieve import ingest
from transfers.dicom.commitment import STORAGE_COMMITMENT_INSTANCE
from transfers.models import PacsDestination

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def gateway(krmc: Facility) -> Iterator[int]:
    gateway_allow(krmc, "PYNETDICOM")
    with gateway_running() as port:
        yield port


class Reports:
    """N-EVENT-REPORTs received, whichever association they come on."""

    def __init__(self) -> None:
        self.received: list[tuple[int, Dataset, str]] = []
        self.arrived = threading.Event()

    def handler(self, event: Any) -> tuple[int, None]:
        self.received.append(
            (event.event_type, event.event_information, event.assoc.requestor.ae_title)
        )
        self.arrived.set()
        return 0x0000, None


def _request(*pairs: tuple[str, str]) -> Dataset:
    request = Dataset()
    request.TransactionUID = generate_uid()
    items = []
    for sop_class, uid in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    request.ReferencedSOPSequence = items
    return request


def _commit(port: int, request: Dataset, *, wait: bool = True) -> tuple[Reports, Any]:
    """N-ACTION; with `wait`, keep the association open until the report came on it."""
    reports = Reports()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="KRMC", evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)]
    )
    assert assoc.is_established
    status, _ = assoc.send_n_action(
        request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
    )
    assert status.Status == 0x0000
    if wait:
        assert reports.arrived.wait(15), "no N-EVENT-REPORT"
    assoc.release()
    return reports, status


def _stored(facility: Facility) -> str:
    data = dicom_bytes("CT_small.dcm")
    ingest(facility, data)
    return str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)


def _audited() -> AuditEvent:
    for _ in range(100):
        event = AuditEvent.objects.filter(action=AuditAction.DICOM_COMMIT).first()
        if event is not None:
            return event
        time.sleep(0.05)
    raise AssertionError("storage commitment not audited")


def test_stored_instances_are_committed(gateway: int, krmc: Facility) -> None:
    uids = [_stored(krmc), _stored(krmc)]
    request = _request(*[(CT, uid) for uid in uids])
    reports, _ = _commit(gateway, request)
    event_type, info, _ = reports.received[0]
    assert event_type == 1
    assert info.TransactionUID == request.TransactionUID
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == uids
    assert "FailedSOPSequence" not in info
    audit = _audited()
    assert audit.detail["committed"] == 2
    assert audit.detail["report"] == "same association"


def test_unknown_and_other_facilities_instances_fail_with_no_such_object(
    gateway: int, krmc: Facility, gfc: Facility
) -> None:
    mine, theirs, unknown = _stored(krmc), _stored(gfc), generate_uid()
    reports, _ = _commit(gateway, _request((CT, mine), (CT, theirs), (CT, unknown)))
    event_type, info, _ = reports.received[0]
    assert event_type == 2
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [mine]
    failed = {i.ReferencedSOPInstanceUID: i.FailureReason for i in info.FailedSOPSequence}
    # Another facility's instance is not confirmed to this caller: as unknown as any.
    assert failed == {theirs: 0x0112, unknown: 0x0112}
    audit = _audited()
    assert (audit.detail["asked"], audit.detail["committed"], audit.detail["failed"]) == (3, 1, 2)


def test_a_wrong_sop_class_is_a_conflict(gateway: int, krmc: Facility) -> None:
    mine = _stored(krmc)
    reports, _ = _commit(gateway, _request(("1.2.840.10008.5.1.4.1.1.4", mine)))
    event_type, info, _ = reports.received[0]
    assert event_type == 2
    assert info.FailedSOPSequence[0].FailureReason == 0x0119


def test_the_report_comes_on_a_new_association_when_the_caller_left(
    gateway: int, krmc: Facility
) -> None:
    # The caller releases at once (as Orthanc does); it listens as a registered destination.
    reports = Reports()
    scp = AE(ae_title="PYNETDICOM")
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    scp_port = _free_port()
    server = scp.start_server(
        ("127.0.0.1", scp_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    assert server is not None
    try:
        PacsDestination.objects.create(
            facility=krmc, name="PACS", ae_title="PYNETDICOM", host="127.0.0.1", port=scp_port
        )
        mine = _stored(krmc)
        _commit(gateway, _request((CT, mine)), wait=False)
        assert reports.arrived.wait(15), "no N-EVENT-REPORT on a new association"
        event_type, info, calling = reports.received[0]
        assert event_type == 1
        assert info.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == mine
        # Relay calls as the facility's AE title, the one the PACS knows.
        assert calling == "KRMC"
        assert _audited().detail["report"] == "new association"
    finally:
        server.shutdown()
