"""Storage Commitment Push Model SCP (PS3.4 Annex J): a sending PACS asks whether Relay safely
keeps the instances it sent, before it deletes its own copies.

Relay commits an instance only when it holds it for the calling facility: received from (or
uploaded by) that facility, its rows committed (nothing is acknowledged before), a SHA-256
recorded for the stored copy, and the study's images not purged. Instances of other facilities,
even with the same UID, are not confirmed: the answer would tell the caller what others hold.

The N-ACTION is answered at once (Success: the request is taken); the result follows as an
N-EVENT-REPORT, after the N-ACTION response as J.3.3 requires:

- EventTypeID 1 when every instance is committed (ReferencedSOPSequence);
- EventTypeID 2 when some are not, each in FailedSOPSequence with its FailureReason: 0x0112
  "no such object instance" (not held for this facility), 0x0119 "class / instance conflict"
  (held under another SOP class).

Where the report goes: on the same association when the caller keeps it open for half a second
after the N-ACTION response (RELEASE_GRACE_S: a caller that does not wait releases at once, and
a report sent into its release would be ignored); when it has been released (Orthanc and IHE RAD-10
actors expect the report on a new association), Relay opens one to the caller's registered
destination (the facility's PacsDestination with the caller's AE title), proposing to be the
Storage Commitment SCP (role selection), over TLS when the destination says so. With neither,
the report is not delivered; the audit event says so (the caller asks again).

Each request is audited (DICOM_COMMIT): how many instances were asked, committed and failed,
and how the report went. Nothing else is stored: no table records commitments.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connections
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

from portal.audit import audit_record
from portal.models import AuditAction, Outcome

from ..models import Instance, PacsDestination
from ..models.studies import UID_BATCH
from .caller import Caller
from .outbound import OutboundRefused, outbound_address
from .push import _tls_args

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # ActionTypeID of the N-ACTION
ALL_COMMITTED = 1  # EventTypeIDs of the N-EVENT-REPORT
SOME_FAILED = 2
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION_TYPE = 0x0123
# How long the report waits for the N-ACTION response to have gone out.
RESPONSE_WAIT_S = 10
# How long a caller that leaves at once has to release before the report goes on its association.
RELEASE_GRACE_S = 0.5
TIMEOUT_S = 30


def commitment_report(caller: Caller, request: Dataset) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT for a commitment request: its EventTypeID and Event Information."""
    asked = [
        (str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", "")))
        for item in request.get("ReferencedSOPSequence", [])
    ]
    uids = [uid for _, uid in asked if uid]
    held: dict[str, str] = {}
    for start in range(0, len(uids), UID_BATCH):
        batch = uids[start : start + UID_BATCH]
        held.update(
            Instance.objects.filter(
                facility=caller.facility,
                sop_instance_uid__in=batch,
                series__study__purged_at__isnull=True,
            )
            .exclude(sha256="")
            .values_list("sop_instance_uid", "sop_class_uid")
        )
    report = Dataset()
    report.TransactionUID = request.TransactionUID
    committed, failed = [], []
    for sop_class, uid in asked:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        if uid in held and held[uid] == sop_class:
            item.RetrieveAETitle = caller.facility.ae_title
            committed.append(item)
            continue
        item.FailureReason = CLASS_INSTANCE_CONFLICT if uid in held else NO_SUCH_OBJECT_INSTANCE
        failed.append(item)
    if committed:
        report.ReferencedSOPSequence = committed
    if failed:
        report.FailedSOPSequence = failed
        return SOME_FAILED, report
    return ALL_COMMITTED, report


def action_answer(caller: Caller, event: Any) -> tuple[int, Dataset | None]:
    """The EVT_N_ACTION handler: take the request, and send its report once the response is
    out (a thread that waits for it)."""
    if event.action_type != REQUEST_COMMITMENT:
        return NO_SUCH_ACTION_TYPE, None
    try:
        request = event.action_information
        if "TransactionUID" not in request or "ReferencedSOPSequence" not in request:
            _audit(caller, asked=0, committed=0, failed=0, report="refused: attributes missing")
            return MISSING_ATTRIBUTE, None
        event_type, report = commitment_report(caller, request)
    except Exception:
        log.exception("gateway: storage commitment from %s failed", caller.source)
        return PROCESSING_FAILURE, None
    response_sent = threading.Event()

    def on_sent(sent: Any) -> None:
        if type(sent.message).__name__ == "N_ACTION_RSP":
            response_sent.set()

    assoc = event.assoc
    assoc.bind(evt.EVT_DIMSE_SENT, on_sent)
    threading.Thread(
        target=_deliver,
        args=(caller, assoc, response_sent, on_sent, event_type, report),
        name=f"commitment-{caller.calling_ae}",
        daemon=True,
    ).start()
    return SUCCESS, None


def _deliver(
    caller: Caller,
    assoc: Any,
    response_sent: threading.Event,
    on_sent: Any,
    event_type: int,
    report: Dataset,
) -> None:
    response_sent.wait(RESPONSE_WAIT_S)
    # A caller that does not wait for the report releases right after the response: give it
    # a moment, rather than send into its release (it would ignore the report).
    deadline = time.monotonic() + RELEASE_GRACE_S
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(Exception):  # the association is gone already
        assoc.unbind(evt.EVT_DIMSE_SENT, on_sent)
    how = "not delivered"
    try:
        if assoc.is_established and _sent_on(assoc, event_type, report):
            how = "same association"
        else:
            close_old_connections()
            how = _new_association(caller, event_type, report)
    except Exception:
        log.exception("gateway: storage commitment report to %s failed", caller.source)
    finally:
        committed = len(report.get("ReferencedSOPSequence", []))
        failed = len(report.get("FailedSOPSequence", []))
        _audit(caller, asked=committed + failed, committed=committed, failed=failed, report=how)
        connections.close_all()


def _sent_on(assoc: Any, event_type: int, report: Dataset) -> bool:
    try:
        status, _ = assoc.send_n_event_report(
            report, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
    except Exception as exc:
        log.info("gateway: commitment report on the same association failed: %s", exc)
        return False
    return bool(status) and status.get("Status") == SUCCESS


def _new_association(caller: Caller, event_type: int, report: Dataset) -> str:
    """The report on an association of its own to the caller's registered destination."""
    destination = PacsDestination.objects.filter(
        facility=caller.facility, ae_title=caller.calling_ae
    ).first()
    if destination is None:
        return "not delivered: the caller is not a registered destination"
    ae = AE(ae_title=caller.facility.ae_title or settings.DICOM_GATEWAY_AE_TITLE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.add_requested_context(STORAGE_COMMITMENT)
    try:
        address = outbound_address(destination.host, destination.port)
        assoc = ae.associate(
            address,
            destination.port,
            ae_title=destination.ae_title,
            ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)],
            tls_args=_tls_args(destination),
        )
    except (OutboundRefused, OSError, ValueError) as exc:
        return f"not delivered: {exc}"[:200]
    if not assoc.is_established:
        return "not delivered: the destination refused the association"
    try:
        ok = _sent_on(assoc, event_type, report)
    finally:
        if assoc.is_established:
            assoc.release()
    return "new association" if ok else "not delivered: the destination did not accept it"


def _audit(caller: Caller, *, asked: int, committed: int, failed: int, report: str) -> None:
    try:
        audit_record(
            action=AuditAction.DICOM_COMMIT,
            facility=caller.facility,
            outcome=Outcome.SUCCESS
            if report in ("same association", "new association")
            else Outcome.FAILURE,
            address=caller.address,
            detail={
                "calling_ae": caller.calling_ae,
                "source": caller.source,
                "asked": asked,
                "committed": committed,
                "failed": failed,
                "report": report,
            },
        )
    except Exception:
        log.exception("gateway: could not audit a storage commitment from %s", caller.source)
