"""Patient reconciliation: a disc from another hospital gets this facility's patient identity.

A patient's CD carries the other hospital's Patient ID (and often a differently spelled name).
Before the study is shared or pushed into this facility's PACS, a sender matches it to the
local patient: Patient ID (the MRN), Patient Name and Issuer of Patient ID are rewritten in
every stored copy. Everything else stays as it came, the UIDs above all: the images keep their
identity, so a PACS that already holds them recognises them.

What the files said before is kept twice: in the audit trail (who changed what, from what, to
what) and in each file's Original Attributes Sequence (0400,0561), the place DICOM keeps
coerced values, with the reason COERCE and the modifying system RELAY.

The rewrite runs in a Celery task (a study can have thousands of images). While it runs the
study cannot be shared or pushed. It is restartable: an instance that already carries the new
identity is skipped, so a task killed halfway is finished by running it again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import transaction
from django.db.models import F
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, Membership, Outcome, User

from .. import dicomio
from ..models import Instance, Series, Study
from ..queue import task_queue_on_commit

log = logging.getLogger(__name__)

BATCH_SIZE = 100
# DICOM LO: 64 characters, no backslash or control characters.
LO_RE = re.compile(r"^[^\\\x00-\x1f]{1,64}$")


class ReconcileError(Exception):
    """Shown to the sender: why the reconciliation cannot be made."""


@dataclass(frozen=True)
class Identity:
    patient_id: str
    patient_name: str
    issuer: str

    def check(self) -> Identity:
        patient_id, name, issuer = (
            self.patient_id.strip(),
            self.patient_name.strip(),
            self.issuer.strip(),
        )
        if not LO_RE.match(patient_id):
            raise ReconcileError("The local patient ID is 1 to 64 characters, no backslash.")
        if not name or len(name) > 324 or "\\" in name or any(ord(c) < 32 for c in name):
            raise ReconcileError("The patient name is needed (Family^Given), no backslash.")
        if issuer and not LO_RE.match(issuer):
            raise ReconcileError("The issuer is at most 64 characters, no backslash.")
        return Identity(patient_id, name, issuer)


def study_reconcile_start(
    *, study: Study, by: User, identity: Identity, request: HttpRequest | None = None
) -> None:
    """Check, claim the study and queue the rewrite; audited with before and after."""
    identity = identity.check()
    membership = Membership.objects.filter(user=by, facility_id=study.facility_id).first()
    if membership is None or not membership.can_upload:
        raise ReconcileError("Only senders and admins of the facility can reconcile its studies.")
    if study.purged_at is not None:
        raise ReconcileError("The images of this study were purged.")
    with transaction.atomic():
        # Claimed only while not purged: this update waits for a purge claiming the study at
        # the same moment, and the purge leaves a study being reconciled alone.
        if not Study.objects.filter(
            pk=study.pk, reconcile_running=False, purged_at__isnull=True
        ).update(reconcile_running=True):
            raise ReconcileError(
                "A reconciliation of this study is already running, or its images were purged."
            )
        audit_record(
            action=AuditAction.PATIENT_RECONCILE,
            request=request,
            actor=by,
            study=study,
            detail={
                "from": {
                    "patient_id": study.patient_id,
                    "patient_name": study.patient_name,
                    "issuer": study.issuer_of_patient_id,
                },
                "to": {
                    "patient_id": identity.patient_id,
                    "patient_name": identity.patient_name,
                    "issuer": identity.issuer,
                },
            },
        )
        task_queue_on_commit(
            "transfers.reconcile.tasks.study_reconcile_task",
            study.pk,
            identity.patient_id,
            identity.patient_name,
            identity.issuer,
        )


def study_reconcile(*, study: Study, identity: Identity) -> int:
    """Rewrite every stored copy not yet carrying `identity`; returns how many were rewritten."""
    storage = storages["default"]
    now = timezone.now()
    rewritten = 0
    last_pk = 0
    while True:
        batch = list(
            Instance.objects.filter(series__study=study, pk__gt=last_pk).order_by("pk")[:BATCH_SIZE]
        )
        if not batch:
            break
        last_pk = batch[-1].pk
        for instance in batch:
            rewritten += _instance_rewrite(instance, identity, now=now, storage=storage)
    Study.objects.filter(pk=study.pk, purged_at__isnull=True).update(
        patient_id=identity.patient_id,
        patient_name=identity.patient_name,
        issuer_of_patient_id=identity.issuer,
        reconciled_at=timezone.now(),
    )
    Study.objects.filter(pk=study.pk).update(reconcile_running=False)
    log.info("study %s reconciled: %d stored copies rewritten", study.uuid, rewritten)
    return rewritten


def study_reconcile_abandon(*, study: Study, reason: str) -> None:
    """A rewrite that kept failing: release the study and audit the failure."""
    Study.objects.filter(pk=study.pk).update(reconcile_running=False)
    log.error("reconciliation of study %s abandoned: %s", study.uuid, reason)
    audit_record(
        action=AuditAction.PATIENT_RECONCILE,
        study=study,
        outcome=Outcome.FAILURE,
        detail={"reason": reason[:300], "note": "stopped; start it again to finish"},
    )


def _instance_rewrite(
    instance: Instance, identity: Identity, *, now: datetime, storage: Storage
) -> int:
    # pydicom here, not at import: the web worker imports this module for its views.
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    with storage.open(instance.storage_key) as f, dicomio.dataset_open(f) as (ds, _):
        pass  # read whole (bounded for a deflated copy): it is rewritten below
    before = {
        "PatientID": str(ds.get("PatientID", "")),
        "PatientName": str(ds.get("PatientName", "")),
        "IssuerOfPatientID": str(ds.get("IssuerOfPatientID", "")),
    }
    after = {
        "PatientID": identity.patient_id,
        "PatientName": identity.patient_name,
        "IssuerOfPatientID": identity.issuer,
    }
    if before == after:
        return 0  # done by an earlier run
    original = Dataset()
    for keyword, value in before.items():
        setattr(original, keyword, value)
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([original])
    item.AttributeModificationDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ModifyingSystem = "RELAY"
    item.ReasonForTheAttributeModification = "COERCE"
    item.SourceOfPreviousValues = ""
    history = list(ds.get("OriginalAttributesSequence", []))
    ds.OriginalAttributesSequence = Sequence([*history, item])
    for keyword, value in after.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    # The transfer syntax and the pixel data are written back exactly as they were.
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    sha256 = hashlib.sha256(data).hexdigest()
    old_key = instance.storage_key
    new_key = storage.save(_new_key(old_key), ContentFile(data))
    delta = len(data) - instance.size_bytes
    try:
        with transaction.atomic():
            if not Instance.objects.filter(pk=instance.pk, storage_key=old_key).update(
                storage_key=new_key,
                size_bytes=len(data),
                sha256=sha256,
                original_sha256=instance.original_sha256 or instance.sha256,
            ):
                # The row is gone (or another run rewrote it): the new copy is nobody's.
                storage.delete(new_key)
                return 0
            Series.objects.filter(pk=instance.series_id).update(size_bytes=F("size_bytes") + delta)
            Study.objects.filter(series__pk=instance.series_id).update(
                size_bytes=F("size_bytes") + delta
            )
    except BaseException:
        storage.delete(new_key)
        raise
    # The old copy goes once the row points at the new one; renders of it go with it.
    storage.delete(old_key)
    _renders_forget(old_key, instance.number_of_frames)
    return 1


def _new_key(old_key: str) -> str:
    """The same folder and SOP Instance UID, a new random suffix (never overwrite in place)."""
    stem = re.sub(r"\.[0-9a-f]{12}\.dcm$", "", old_key)
    return f"{stem}.{uuid.uuid4().hex[:12]}.dcm"


def _renders_forget(storage_key: str, frames: int) -> None:
    """Renders are kept by the stored copy's key: the old copy's are deleted (the viewer makes
    new ones on demand; they hold no patient name, but nothing should outlive its image)."""
    from ..viewer.render import instance_render_keys

    storage = storages["default"]
    for key in instance_render_keys(storage_key=storage_key, number_of_frames=frames):
        if storage.exists(key):
            storage.delete(key)
