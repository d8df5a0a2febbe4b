"""C-MOVE and C-GET on the gateway: a facility's PACS takes studies out of Relay.

What may be retrieved is what the facility may query (query.visible_studies): its own studies
and those shared with it with the import right. The identifier's unique keys name what to send
(PatientID at PATIENT level of Patient Root; StudyInstanceUID, SeriesInstanceUID or
SOPInstanceUID lists below).

C-MOVE sends only to a PACS registered as one of the calling facility's destinations
(PacsDestination whose AE title is the Move Destination), at its checked address
(outbound.outbound_address) and over TLS when the destination says so, as a push does; any
other Move Destination is refused with 0xA801 and audited. C-GET sends back on the caller's own
association.

Each instance goes in its stored transfer syntax when the receiver accepted it, else decompressed
(or re-encoded little endian) with the push's conversion, keeping its SOP Instance UID. pynetdicom
sends data sets, not files, so one instance at a time is read (pixel data deferred: read from
the file as it is encoded). Every stored copy is checked against its SHA-256 before any of it
leaves: a damaged one fails its own sub-operation (and is reported as an integrity failure), the
others go on.

Audited per study like a push (DICOM_RETRIEVE: where to, how many sent and failed); a study
held through a share is metered like a push (a delivery per instance accepted, to the calling
facility) and gets an "imported" entry on the share's timeline.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.files.storage import Storage, storages
from django.db import transaction
from django.db.models import Case, IntegerField, Q, Value, When
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import build_context, evt

from portal.audit import audit_record
from portal.models import AuditAction, Outcome

from .. import integrity
from ..deliveries import DeliveryKind, delivery_announce
from ..models import Instance, PacsDestination, Share, ShareEvent, ShareEventKind, Study
from .caller import Caller
from .outbound import OutboundRefused, outbound_address
from .push import MAX_CONTEXTS, UNCOMPRESSED, _converted, _local_file, _tls_args
from .query import PATIENT_ROOT, QueryError, import_share, query_level, visible_studies

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
# pynetdicom refuses (0xC516) a retrieval of more than 65535 instances: the sub-operation
# counters are US.
MAX_SUBOPERATIONS = 65535
# Deferred reading: elements over this size (the pixel data) stay in the file until sent.
DEFER_SIZE = "256 KB"
# A transfer syntax no one accepts: the data set that stands for an instance that could not be
# read, so that pynetdicom counts it as a failed sub-operation and lists its UID.
UNSENDABLE_SYNTAX = "1.2.840.10008.1.2.1.98765"
DELIVERED = {0x0000, 0xB000, 0xB006, 0xB007}


def retrieve_instances(caller: Caller, identifier: Dataset, model: str) -> list[Instance]:
    """The instances the identifier names among those the caller may retrieve, each SOP
    Instance UID once (the facility's own copy first)."""
    level = query_level(identifier, model)

    def uids(keyword: str) -> list[str]:
        raw = identifier.get(keyword)
        values = list(raw) if isinstance(raw, MultiValue | list) else [raw]
        return [str(v).strip() for v in values if v is not None and str(v).strip()]

    condition = Q()
    required = {
        "PATIENT": "PatientID",
        "STUDY": "StudyInstanceUID",
        "SERIES": "SeriesInstanceUID",
        "IMAGE": "SOPInstanceUID",
    }[level]
    if not uids(required):
        raise QueryError(f"{required} is required at the {level} level")
    if model in PATIENT_ROOT and uids("PatientID"):
        condition &= Q(series__study__patient_id__in=uids("PatientID"))
    if level in ("STUDY", "SERIES", "IMAGE") and uids("StudyInstanceUID"):
        condition &= Q(series__study__study_instance_uid__in=uids("StudyInstanceUID"))
    if level in ("SERIES", "IMAGE") and uids("SeriesInstanceUID"):
        condition &= Q(series__series_instance_uid__in=uids("SeriesInstanceUID"))
    if level == "IMAGE":
        condition &= Q(sop_instance_uid__in=uids("SOPInstanceUID"))
    rows = (
        Instance.objects.filter(series__study__in=visible_studies(caller.facility))
        .filter(condition)
        .select_related("series__study")
        .annotate(
            relay_own=Case(
                When(facility_id=caller.facility.pk, then=Value(0)),
                default=Value(1),
                output_field=IntegerField(),
            )
        )
        .order_by("relay_own", "series__study_id", "series_id", "instance_number", "pk")
    )
    seen: set[str] = set()
    chosen = []
    for instance in rows.iterator():
        if instance.sop_instance_uid not in seen:
            seen.add(instance.sop_instance_uid)
            chosen.append(instance)
    return chosen


def move_contexts(instances: list[Instance]) -> list[Any]:
    """The sub-association's presentation contexts, as a push offers them: each SOP class in
    each stored syntax, and uncompressed little endian as the fallback."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for instance in instances:
        wanted[instance.sop_class_uid].add(instance.transfer_syntax_uid)
    contexts = []
    for sop_class, syntaxes in sorted(wanted.items()):
        for syntax in sorted(syntaxes - set(UNCOMPRESSED)):
            contexts.append(build_context(sop_class, [syntax]))
        contexts.append(build_context(sop_class, UNCOMPRESSED))
    if len(contexts) > MAX_CONTEXTS:
        contexts = [build_context(sop_class, UNCOMPRESSED) for sop_class in sorted(wanted)]
    return contexts[:MAX_CONTEXTS]


class Retrieval:
    """One C-MOVE or C-GET: what was sent, what failed, per study, for the audit trail and the
    meter. The C-STORE answers are read as they arrive (EVT_DIMSE_RECV)."""

    def __init__(self, caller: Caller, *, kind: str, destination: PacsDestination | None) -> None:
        self.caller = caller
        self.kind = kind
        self.destination = destination
        self.key = uuid.uuid4().hex
        self.accepted: dict[str, set[str]] = defaultdict(set)
        self.answers: dict[str, int] = {}
        # The last C-STORE answer, for a peer that leaves out the Affected SOP Instance UID.
        self.last: int | None = None
        self.sent: dict[int, int] = defaultdict(int)
        self.failed: dict[int, int] = defaultdict(int)
        self.studies: dict[int, Study] = {}
        self.shares: dict[int, Share | None] = {}
        self.cancelled = False
        self.started = False

    def remember_contexts(self, contexts: list[Any], *, as_scu: bool = False) -> None:
        for context in contexts:
            if as_scu and not context.as_scu:
                continue
            if context.abstract_syntax and context.transfer_syntax:
                self.accepted[str(context.abstract_syntax)].add(str(context.transfer_syntax[0]))

    def on_established(self, event: Any) -> None:
        self.remember_contexts(event.assoc.accepted_contexts)

    def on_message(self, event: Any) -> None:
        message = event.message
        if type(message).__name__ != "C_STORE_RSP":
            return
        command = message.command_set
        uid = str(command.get("AffectedSOPInstanceUID", "") or "")
        status = command.get("Status")
        if uid and status is not None:
            self.answers[uid] = int(status)
        if status is not None:
            self.last = int(status)

    @contextmanager
    def dataset(self, storage: Storage, instance: Instance) -> Iterator[Dataset]:
        """The instance as it will be sent: stored, or converted to an accepted uncompressed
        syntax; a stand-in that fails its sub-operation when it cannot be sent."""
        offered = self.accepted.get(instance.sop_class_uid, set())
        try:
            if instance.transfer_syntax_uid in offered:
                with _local_file(storage, instance) as path:
                    yield dcmread(path, defer_size=DEFER_SIZE)
                return
            syntax = next((s for s in UNCOMPRESSED if s in offered), None)
            if syntax is not None:
                with _converted(storage, instance, syntax=str(syntax)) as path:
                    yield dcmread(path, defer_size=DEFER_SIZE)
                return
        except integrity.IntegrityError as exc:
            integrity.integrity_failure(
                instance, f"dicom {self.kind}", key=exc.key, reason=exc.reason
            )
        except Exception:
            log.exception("gateway: could not read instance %s for a %s", instance.pk, self.kind)
        yield _unsendable(instance)

    def record(self, instance: Instance) -> None:
        """The answer to the instance just sent (known once pynetdicom asks for the next)."""
        study = instance.series.study
        self.studies.setdefault(study.pk, study)
        status = self.answers.get(instance.sop_instance_uid, self.last)
        if status not in DELIVERED:
            self.failed[study.pk] += 1
            return
        self.sent[study.pk] += 1
        if study.pk not in self.shares:
            self.shares[study.pk] = import_share(self.caller.facility, study)
        share = self.shares[study.pk]
        if share is not None:
            with transaction.atomic():
                delivery_announce(
                    kind=DeliveryKind.PUSH,
                    share=share,
                    study=study,
                    user=None,
                    nbytes=instance.size_bytes,
                    images=1,
                    key_parts=("dicom", self.key, instance.pk),
                    to_facility=self.caller.facility,
                )

    def finish(self) -> None:
        """One audit event per study, and the share's timeline for shared ones."""
        where = (
            str(self.destination)
            if self.destination is not None
            else f"{self.caller.calling_ae} (C-GET)"
        )
        for study_pk, study in self.studies.items():
            sent, failed = self.sent[study_pk], self.failed[study_pk]
            share = self.shares.get(study_pk)
            detail: dict[str, object] = {
                "via": self.kind,
                "calling_ae": self.caller.calling_ae,
                "source": self.caller.source,
                "destination": where,
                "sent": sent,
                "failed": failed,
                "retrieval": self.key,
            }
            if self.cancelled:
                detail["cancelled"] = True
            if share is not None:
                detail["share"] = str(share.uuid)
            try:
                with transaction.atomic():
                    audit_record(
                        action=AuditAction.DICOM_RETRIEVE,
                        study=study,
                        actor_facility=self.caller.facility,
                        outcome=Outcome.SUCCESS if sent and not failed else Outcome.FAILURE,
                        address=self.caller.address,
                        detail=detail,
                    )
                    if share is not None and sent:
                        ShareEvent.objects.create(
                            share=share,
                            kind=ShareEventKind.IMPORTED,
                            actor_label=f"{self.caller.calling_ae} (DICOM {self.kind})"[:254],
                            detail=f"{sent} of {sent + failed} images into {where}"[:300],
                        )
            except Exception:
                log.exception(
                    "gateway: could not audit a %s from %s", self.kind, self.caller.source
                )


def _unsendable(instance: Instance) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = instance.sop_class_uid
    ds.SOPInstanceUID = instance.sop_instance_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(UNSENDABLE_SYNTAX)
    return ds


def _refusal_audit(caller: Caller, *, kind: str, reason: str, destination: str = "") -> None:
    try:
        audit_record(
            action=AuditAction.DICOM_RETRIEVE,
            facility=caller.facility,
            outcome=Outcome.FAILURE,
            address=caller.address,
            detail={
                "via": kind,
                "calling_ae": caller.calling_ae,
                "source": caller.source,
                "destination": destination[:16],
                "reason": reason[:200],
            },
        )
    except Exception:
        log.exception("gateway: could not audit a refused %s from %s", kind, caller.source)


def _send_all(
    retrieval: Retrieval, instances: list[Instance], event: Any
) -> Iterator[tuple[int, Dataset | None]]:
    storage = storages["default"]
    retrieval.started = True
    try:
        for instance in instances:
            if event.is_cancelled:
                retrieval.cancelled = True
                yield CANCEL, None
                return
            retrieval.last = None
            with retrieval.dataset(storage, instance) as ds:
                yield PENDING, ds
            retrieval.record(instance)
    finally:
        retrieval.finish()


def move_answers(caller: Caller, event: Any) -> Iterator[Any]:
    """The EVT_C_MOVE handler's generator: the destination, the count, then each instance."""
    model = str(event.context.abstract_syntax)
    name = _ae(event.move_destination)
    destination = PacsDestination.objects.filter(facility=caller.facility, ae_title=name).first()
    if destination is None:
        _refusal_audit(
            caller,
            kind="C-MOVE",
            reason="not a registered destination of the facility",
            destination=name,
        )
        yield None, None
        return
    try:
        address = outbound_address(destination.host, destination.port)
    except OutboundRefused as exc:
        _refusal_audit(caller, kind="C-MOVE", reason=str(exc), destination=name)
        yield None, None
        return
    try:
        instances = retrieve_instances(caller, event.identifier, model)
    except QueryError as exc:
        _refusal_audit(caller, kind="C-MOVE", reason=str(exc), destination=name)
        instances = []
    retrieval = Retrieval(caller, kind="C-MOVE", destination=destination)
    kwargs = {
        "contexts": move_contexts(instances),
        "tls_args": _tls_args(destination),
        "evt_handlers": [
            (evt.EVT_ESTABLISHED, retrieval.on_established),
            (evt.EVT_DIMSE_RECV, retrieval.on_message),
        ],
    }
    instances = instances[:MAX_SUBOPERATIONS]
    try:
        yield address, destination.port, kwargs
        yield len(instances)
        yield from _send_all(retrieval, instances, event)
    finally:
        if instances and not retrieval.started:
            # pynetdicom answered 0xA801 itself: the destination did not take the association.
            _refusal_audit(
                caller,
                kind="C-MOVE",
                reason=f"{destination} did not accept the association",
                destination=name,
            )


def get_answers(caller: Caller, event: Any) -> Iterator[Any]:
    """The EVT_C_GET handler's generator: the count, then each instance, sent back on the
    caller's association in a syntax it accepted for the Storage SCP role."""
    model = str(event.context.abstract_syntax)
    try:
        instances = retrieve_instances(caller, event.identifier, model)
    except QueryError as exc:
        _refusal_audit(caller, kind="C-GET", reason=str(exc))
        instances = []
    instances = instances[:MAX_SUBOPERATIONS]
    retrieval = Retrieval(caller, kind="C-GET", destination=None)
    retrieval.remember_contexts(event.assoc.accepted_contexts, as_scu=True)
    event.assoc.bind(evt.EVT_DIMSE_RECV, retrieval.on_message)
    try:
        yield len(instances)
        yield from _send_all(retrieval, instances, event)
    finally:
        event.assoc.unbind(evt.EVT_DIMSE_RECV, retrieval.on_message)


def _ae(value: str | bytes) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip()
