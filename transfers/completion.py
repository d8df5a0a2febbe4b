"""When a study is complete, so that its recipients are told only once everything arrived.

An upload through the browser or `relay send` ends with a manifest: the SOP Instance UID and
SHA-256 of every file it sent. The SHA-256 is of the file with its 128-byte preamble zeroed,
which is the copy Relay stores (see ingest). A study is complete when every instance the manifest
lists for it is stored with that hash. A study that arrives without a manifest (through the DICOM
gateway) is complete after RELAY_STUDY_QUIET_SECONDS with nothing new (`studies_complete_quiet`,
run every minute by Celery beat through `transfers.tasks`).

`relay send` announces every file before it uploads any (`expectations_announce`: SOP
Instance UID, SHA-256 and Study Instance UID). A study with an announced instance that is not
stored with that hash is never completed, neither by a manifest nor by the quiet period, so a
run that partly failed or was killed leaves it receiving and its recipients are not told. The
expectation goes when the instance is stored intact and listed in a manifest (or the quiet
check finds it stored), when the sender withdraws it (a rejected file) or gives up on the study
(`expectations_give_up`, the study page's "Complete without them"), or after
RELAY_EXPECTED_HOURS (72), after which the quiet period completes the study as it would any
other.

A study that completes is rendered for the viewer, its waiting shares are notified, and one
that came from a PACS is shared by its facility's routing rules.

Images that arrive after a study completed (a late series, a resend with more) put it back to
receiving until they settle by the same rules (their upload's manifest, or the quiet period;
announced images still outstanding hold it back). Receiving hides nothing: recipients open,
view and download what is there meanwhile. When it completes again the new images are
rendered, and each share already notified is told once of the batch ("N new images added",
on the share's timeline too); routing rules share nothing twice (once per rule and study).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, Facility, User

from .dicom.routing import routing_apply
from .models import UID_BATCH, ExpectedInstance, Instance, Study, StudyStatus
from .sharing.services import shares_notify_added, shares_notify_completed
from .uids import is_valid_uid
from .viewer.tasks import study_render_queue

MAX_MANIFEST = 20_000
_SHA256_DIGITS = frozenset("0123456789abcdef")


class ManifestError(Exception):
    pass


@dataclass
class ManifestResult:
    complete: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "incomplete": self.incomplete,
            "missing": self.missing,
            "mismatched": self.mismatched,
        }


def _valid_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in _SHA256_DIGITS for c in value)


def _manifest_entries(
    entries: list[dict[str, str]], *, with_study: bool
) -> dict[str, tuple[str, str]]:
    """{sop_instance_uid: (sha256, study_instance_uid or "")}; raises ManifestError."""
    if not entries or len(entries) > MAX_MANIFEST:
        raise ManifestError(f"A manifest lists 1 to {MAX_MANIFEST} instances.")
    wanted: dict[str, tuple[str, str]] = {}
    for entry in entries:
        uid = str(entry.get("sop_instance_uid", ""))
        sha = str(entry.get("sha256", "")).lower()
        study_uid = str(entry.get("study_instance_uid", "")) if with_study else ""
        if not is_valid_uid(uid) or not _valid_sha256(sha):
            raise ManifestError(
                "Each entry needs a valid 'sop_instance_uid' and a 64-hex-digit 'sha256'."
            )
        if with_study and not is_valid_uid(study_uid):
            raise ManifestError("Each announced entry needs a valid 'study_instance_uid'.")
        wanted[uid] = (sha, study_uid)
    return wanted


def _stored_hashes(facility: Facility, uids: list[str]) -> dict[str, tuple[set[str], int]]:
    """{sop_instance_uid: (the hashes it is known by, study pk)} of the facility's instances.

    A copy rewritten since (patient reconciliation) is still known by the hash it came with."""
    return {
        uid: ({sha, original} - {""}, study_id)
        for uid, sha, original, study_id in Instance.objects.rows_by_uid(
            facility, uids, "sop_instance_uid", "sha256", "original_sha256", "series__study_id"
        )
    }


def expected_outstanding() -> QuerySet[ExpectedInstance]:
    """Announced instances not yet stored with their hash, and not expired."""
    cutoff = timezone.now() - timedelta(hours=getattr(settings, "RELAY_EXPECTED_HOURS", 72))
    stored = Instance.objects.filter(
        facility_id=OuterRef("facility_id"), sop_instance_uid=OuterRef("sop_instance_uid")
    ).filter(Q(sha256=OuterRef("sha256")) | Q(original_sha256=OuterRef("sha256")))
    return ExpectedInstance.objects.filter(announced_at__gt=cutoff).exclude(Exists(stored))


def _studies_waiting(studies: list[Study]) -> set[int]:
    """The pks of those studies that still wait for an announced instance."""
    by_key = {(s.facility_id, s.study_instance_uid): s.pk for s in studies}
    uids = sorted({uid for _, uid in by_key})
    waiting: set[int] = set()
    for start in range(0, len(uids), UID_BATCH):
        for key in (
            expected_outstanding()
            .filter(study_instance_uid__in=uids[start : start + UID_BATCH])
            .values_list("facility_id", "study_instance_uid")
            .distinct()
        ):
            if key in by_key:
                waiting.add(by_key[key])
    return waiting


def expected_count(*, study: Study) -> int:
    """How many announced instances the study still waits for (the study page shows it)."""
    return (
        expected_outstanding()
        .filter(facility_id=study.facility_id, study_instance_uid=study.study_instance_uid)
        .count()
    )


def expectations_announce(*, facility: Facility, entries: list[dict[str, str]]) -> dict[str, int]:
    """Record what an upload is about to send; its studies wait for every file of it.

    An instance already stored with that hash is not recorded; announcing a file again
    renews its expectation (a second run of the same `relay send`)."""
    wanted = _manifest_entries(entries, with_study=True)
    stored = _stored_hashes(facility, list(wanted))
    now = timezone.now()
    rows = [
        ExpectedInstance(
            facility=facility,
            study_instance_uid=study_uid,
            sop_instance_uid=uid,
            sha256=sha,
            announced_at=now,
        )
        for uid, (sha, study_uid) in wanted.items()
        if not (uid in stored and sha in stored[uid][0])
    ]
    ExpectedInstance.objects.bulk_create(
        rows,
        batch_size=UID_BATCH,
        update_conflicts=True,
        unique_fields=["facility", "sop_instance_uid"],
        update_fields=["study_instance_uid", "sha256", "announced_at"],
    )
    return {"announced": len(rows), "already_stored": len(wanted) - len(rows)}


def manifest_apply(
    *, facility: Facility, entries: list[dict[str, str]], withdraw: list[str] | None = None
) -> ManifestResult:
    """Mark complete every study all of whose listed instances are stored intact and that
    waits for no announced instance. `withdraw`: SOP Instance UIDs the sender no longer
    expects (files the server rejected); their expectations go."""
    withdrawn = [str(uid) for uid in withdraw or []]
    if len(withdrawn) > MAX_MANIFEST or not all(is_valid_uid(uid) for uid in withdrawn):
        raise ManifestError(f"'withdraw' lists at most {MAX_MANIFEST} valid SOP Instance UIDs.")
    wanted = (
        {uid: sha for uid, (sha, _) in _manifest_entries(entries, with_study=False).items()}
        if entries or not withdrawn  # only withdrawals: the instance list may be empty
        else {}
    )
    stored = _stored_hashes(facility, list(wanted))
    result = ManifestResult()
    bad_studies: set[int] = set()
    studies: set[int] = set()
    intact: list[str] = []
    for uid, sha in wanted.items():
        if uid not in stored:
            result.missing.append(uid)
            continue
        known, study_id = stored[uid]
        studies.add(study_id)
        if sha not in known:
            result.mismatched.append(uid)
            bad_studies.add(study_id)
        else:
            intact.append(uid)
    if result.missing:
        # The study of a missing instance is known only if it was announced; when one is not,
        # every study of this manifest stays receiving, which the client sees in "missing".
        missing_studies: set[str] = set()
        announced = 0
        for start in range(0, len(result.missing), UID_BATCH):
            for study_uid in ExpectedInstance.objects.filter(
                facility=facility, sop_instance_uid__in=result.missing[start : start + UID_BATCH]
            ).values_list("study_instance_uid", flat=True):
                announced += 1
                missing_studies.add(study_uid)
        if announced < len(result.missing):
            bad_studies |= studies
        else:
            bad_studies |= set(
                Study.objects.filter(
                    pk__in=studies, study_instance_uid__in=missing_studies
                ).values_list("pk", flat=True)
            )
    with transaction.atomic():
        # Expectations met (stored intact, listed here) or withdrawn by the sender go.
        done = intact + withdrawn
        for start in range(0, len(done), UID_BATCH):
            ExpectedInstance.objects.filter(
                facility=facility, sop_instance_uid__in=done[start : start + UID_BATCH]
            ).delete()
        candidates = list(Study.objects.filter(pk__in=studies).order_by("pk"))
        bad_studies |= _studies_waiting([s for s in candidates if s.pk not in bad_studies])
        completed: list[Study] = []
        for study in candidates:
            if study.pk in bad_studies:
                result.incomplete.append(str(study.uuid))
                continue
            if _complete(study):
                # Just completed: every frame is made ready for the viewer in the render queue.
                study_render_queue(study)
                completed.append(study)
            result.complete.append(str(study.uuid))
        shares_notify_completed()
        # Images added to a study whose shares were already told: "N new images added".
        shares_notify_added(studies=completed)
    return result


def _complete(study: Study) -> bool:
    return bool(
        Study.objects.filter(pk=study.pk)
        .exclude(status=StudyStatus.COMPLETE)
        .update(status=StudyStatus.COMPLETE, completed_at=timezone.now())
    )


def expectations_give_up(*, study: Study, by: User, request: HttpRequest | None = None) -> int:
    """The sender gives up on the images announced for the study and not arrived: their
    expectations go and the study is complete (recipients told). Audited. Returns how many
    images it was waiting for."""
    with transaction.atomic():
        expected = ExpectedInstance.objects.filter(
            facility_id=study.facility_id, study_instance_uid=study.study_instance_uid
        )
        waiting = expected_count(study=study)
        expected.delete()
        completed = bool(
            Study.objects.filter(pk=study.pk, status=StudyStatus.RECEIVING).update(
                status=StudyStatus.COMPLETE, completed_at=timezone.now()
            )
        )
        audit_record(
            action=AuditAction.STUDY_COMPLETE,
            request=request,
            actor=by,
            study=study,
            detail={"reason": "completed without announced images", "missing": waiting},
        )
        if completed:
            study_render_queue(study)
        shares_notify_completed()
        if completed:
            shares_notify_added(studies=[study])
    return waiting


def studies_complete_quiet() -> int:
    """A study that has received nothing for the quiet period is complete; returns how many.

    One conditional UPDATE: safe to run twice or on two beats at once.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.RELAY_STUDY_QUIET_SECONDS)
    # Expired expectations go; a study still waiting for an announced image stays receiving.
    ExpectedInstance.objects.filter(
        announced_at__lte=timezone.now()
        - timedelta(hours=getattr(settings, "RELAY_EXPECTED_HOURS", 72))
    ).delete()
    candidates = list(
        Study.objects.filter(status=StudyStatus.RECEIVING, last_received_at__lte=cutoff).only(
            "pk", "facility_id", "study_instance_uid"
        )
    )
    waiting = _studies_waiting(candidates)
    quiet = [s.pk for s in candidates if s.pk not in waiting]
    # The cutoff again in the update: an instance that arrived since the list was read keeps
    # its study receiving.
    completed = Study.objects.filter(
        pk__in=quiet, status=StudyStatus.RECEIVING, last_received_at__lte=cutoff
    ).update(status=StudyStatus.COMPLETE, completed_at=timezone.now())
    for study in Study.objects.filter(pk__in=quiet, status=StudyStatus.COMPLETE):
        # Every frame made ready for the viewer, in the render queue.
        study_render_queue(study)
        # Studies from a PACS are shared by their facility's routing rules (once per rule).
        if study.received_from_ae:
            routing_apply(study=study)
    # Shares made while their studies were still arriving are notified now.
    shares_notify_completed()
    # Shares told before more images arrived (a late series, a resend) are told of them.
    shares_notify_added(
        studies=Study.objects.filter(pk__in=quiet, status=StudyStatus.COMPLETE).only("pk")
    )
    return completed
