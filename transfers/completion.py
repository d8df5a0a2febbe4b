"""When a study is complete, so that its recipients are told only once everything arrived.

An upload through the browser or `relay send` ends with a manifest: the SOP Instance UID and
SHA-256 of every file it sent. The SHA-256 is of the file with its 128-byte preamble zeroed,
which is the copy Relay stores (see ingest). A study is complete when every instance the manifest
lists for it is stored with that hash. A study that arrives without a manifest (through the DICOM
gateway) is complete after RELAY_STUDY_QUIET_SECONDS with nothing new (`studies_complete_quiet`,
run every minute by Celery beat through `transfers.tasks`).

A study that completes is rendered for the viewer, its waiting shares are notified, and one
that came from a PACS is shared by its facility's routing rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from portal.models import Facility

from .dicom.routing import routing_apply
from .ingest import is_valid_uid
from .models import Instance, Study, StudyStatus
from .sharing.services import shares_notify_completed
from .viewer.tasks import study_render_queue

MAX_MANIFEST = 20_000


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


def manifest_apply(*, facility: Facility, entries: list[dict[str, str]]) -> ManifestResult:
    """Mark complete every study all of whose listed instances are stored intact."""
    if not entries or len(entries) > MAX_MANIFEST:
        raise ManifestError(f"A manifest lists 1 to {MAX_MANIFEST} instances.")
    wanted: dict[str, str] = {}
    for entry in entries:
        uid = str(entry.get("sop_instance_uid", ""))
        sha = str(entry.get("sha256", "")).lower()
        if not is_valid_uid(uid) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ManifestError(
                "Each entry needs a valid 'sop_instance_uid' and a 64-hex-digit 'sha256'."
            )
        wanted[uid] = sha
    # A copy rewritten since (patient reconciliation) is still known by the hash it came with.
    stored: dict[str, tuple[set[str], int]] = {
        uid: ({sha, original} - {""}, study_id)
        for uid, sha, original, study_id in Instance.objects.rows_by_uid(
            facility,
            list(wanted),
            "sop_instance_uid",
            "sha256",
            "original_sha256",
            "series__study_id",
        )
    }
    result = ManifestResult()
    bad_studies: set[int] = set()
    studies: set[int] = set()
    for uid, sha in wanted.items():
        if uid not in stored:
            result.missing.append(uid)
            continue
        known, study_id = stored[uid]
        studies.add(study_id)
        if sha not in known:
            result.mismatched.append(uid)
            bad_studies.add(study_id)
    # A missing instance's study is unknown here; its study stays receiving if any listed
    # instance of it is missing, which the client sees in "missing" and sends again.
    if result.missing:
        bad_studies |= studies
    with transaction.atomic():
        for study in Study.objects.filter(pk__in=studies).order_by("pk"):
            if study.pk in bad_studies:
                result.incomplete.append(str(study.uuid))
                continue
            if (
                Study.objects.filter(pk=study.pk)
                .exclude(status=StudyStatus.COMPLETE)
                .update(status=StudyStatus.COMPLETE, completed_at=timezone.now())
            ):
                # Just completed: every frame is made ready for the viewer in the render queue.
                study_render_queue(study)
            result.complete.append(str(study.uuid))
        shares_notify_completed()
    return result


def studies_complete_quiet() -> int:
    """A study that has received nothing for the quiet period is complete; returns how many.

    One conditional UPDATE: safe to run twice or on two beats at once.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.RELAY_STUDY_QUIET_SECONDS)
    quiet = list(
        Study.objects.filter(
            status=StudyStatus.RECEIVING, last_received_at__lte=cutoff
        ).values_list("pk", flat=True)
    )
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
    return completed
