"""Purge: the images of studies nobody may open any more are deleted; the record stays.

`purge_expired` is safe to run twice or on two machines at once (Celery beat calls it daily
through `transfers.tasks.purge_expired`; the `purge_expired` management command by hand). The
shares' own expiry (the EXPIRED receipt, the warning e-mail) is `transfers.sharing.expiry`.

When a study is purged
    A study is purged when it is not purged yet, its facility's retention period
    (`Facility.retention_days`) has passed since its last image arrived (`last_received_at`, so a
    study still growing is never cut short), and it has no live share (one neither revoked nor
    past its expiry). A study that was never shared is purged on the same rule: Relay carries
    studies between facilities and is not an archive, so an unshared upload is kept for the
    retention period (time enough to share it) and no longer.

What goes, what stays
    Goes: every instance object in storage and its Instance row, and the study's reports (the PDF
    object and the row; typed text too), because a report is patient data of the same study.
    Renders and exports, once they exist, go in `_study_empty` the same way.
    Stays, as the tombstone: the Study row (patient, date, description, counts, size) with
    `purged_at` and `purged_bytes`, its Series rows (what each series was), every share and its
    timeline, and the whole audit trail, plus one PURGE audit event with the bytes freed.

Surviving a kill halfway
    A purge has two steps. The *claim* is one short transaction: lock the study row, re-check that
    it is still purgeable (a share made meanwhile wins) and set `purged_at`. From that commit on,
    the study is a tombstone to everyone: it cannot be shared, attached to, or found in an inbox.
    The *emptying* then works in batches: delete the batch's objects from storage (a missing
    object is fine, an earlier run may have deleted it), then in one transaction delete the
    batch's rows and add their sizes to `purged_bytes`. The transaction that removes the last row
    also writes the PURGE audit event, so it is written exactly once. A study with `purged_at` set
    that still has rows is unfinished work: every run first finishes those, then claims new ones.
    A kill at any point therefore leaves either an unclaimed study (nothing deleted) or a claimed
    one that the next run empties; a row is counted in `purged_bytes` only in the transaction
    that deletes it, so bytes are never counted twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import reduce
from operator import or_
from typing import Any

from django.core.files.storage import Storage, storages
from django.db import transaction
from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet, Sum
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, Facility

from .models import (
    ORIGINALS,
    Instance,
    MediaExport,
    Report,
    Share,
    ShareEvent,
    ShareEventKind,
    Study,
)

log = logging.getLogger(__name__)

# Rows (and objects) handled per transaction while emptying a study: small enough that a kill
# loses little work and no lock is held for long, large enough for few round trips.
BATCH_SIZE = 200


# --- share expiry ---------------------------------------------------------------------------------


@dataclass
class PurgedStudy:
    """One study a purge run emptied (or, in a dry run, would empty)."""

    uuid: str
    facility: str
    study_date: date | None
    objects: int
    bytes: int


@dataclass
class PurgeResult:
    """What one `purge_expired` run freed, or in a dry run would free."""

    dry_run: bool
    studies: list[PurgedStudy] = field(default_factory=list)
    # (study uuid, error) for studies a run could not finish; the next run finishes them.
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def studies_purged(self) -> int:
        return len(self.studies)

    @property
    def bytes_freed(self) -> int:
        return sum(s.bytes for s in self.studies)

    @property
    def objects_deleted(self) -> int:
        return sum(s.objects for s in self.studies)

    @property
    def freed(self) -> list[tuple[str, int]]:
        return [(s.uuid, s.bytes) for s in self.studies]


def studies_purgeable(*, now: datetime) -> QuerySet[Study]:
    """Studies whose images may be purged at `now` (see the module docstring for the rule)."""
    live_share = Share.objects.filter(
        studies=OuterRef("pk"), revoked_at__isnull=True, expires_at__gt=now
    )
    # Retention is per facility; one condition per distinct retention period keeps it one query.
    periods = Facility.objects.values_list("retention_days", flat=True).distinct()
    past_retention = [
        Q(facility__retention_days=days, last_received_at__lte=now - timedelta(days=days))
        for days in periods
    ]
    if not past_retention:
        return Study.objects.none()
    # A de-identified copy belongs to its share: it goes when the share lapses, whatever the
    # retention (transfers.models.deidentify).
    copy = ~ORIGINALS
    # A study being reconciled is rewritten copy by copy: it waits for the next run.
    return Study.objects.filter(
        reduce(or_, past_retention) | copy, purged_at__isnull=True, reconcile_running=False
    ).exclude(Exists(live_share))


def studies_purge_unfinished() -> QuerySet[Study]:
    """Studies claimed by a purge that was stopped before it had emptied them."""
    return Study.objects.filter(purged_at__isnull=False).filter(
        Exists(Instance.objects.filter(series__study=OuterRef("pk")))
        | Exists(Report.objects.filter(study=OuterRef("pk")))
        | Exists(MediaExport.objects.filter(study=OuterRef("pk")))
    )


def purge_expired(*, dry_run: bool = False, now: datetime | None = None) -> PurgeResult:
    """Delete the images of every study nobody may open any more; keep the tombstone.

    First finishes studies an interrupted run claimed, then claims and empties the purgeable
    ones. A study that fails (storage unreachable) is logged, reported in `failed` and left
    claimed for the next run; the others go ahead. With `dry_run` nothing changes and the result
    lists what would go. A second run frees nothing.
    """
    now = now or timezone.now()
    result = PurgeResult(dry_run=dry_run)
    unfinished = list(studies_purge_unfinished().select_related("facility").order_by("pk"))
    fresh = list(studies_purgeable(now=now).select_related("facility").order_by("pk"))
    if dry_run:
        for study in unfinished + fresh:
            objects, size = _study_contents(study)
            result.studies.append(_summary(study, objects=objects, size=size))
        return result

    storage = storages["default"]
    for study in unfinished + fresh:
        try:
            if study.purged_at is None and not _study_claim(study=study, now=now):
                continue  # a share was made meanwhile, or another run took it
            objects, size = _study_empty(study=study, storage=storage)
        except Exception as exc:
            log.exception("purge of study %s stopped; the next run finishes it", study.uuid)
            result.failed.append((str(study.uuid), f"{type(exc).__name__}: {exc}"[:300]))
            continue
        result.studies.append(_summary(study, objects=objects, size=size))
    return result


def _summary(study: Study, *, objects: int, size: int) -> PurgedStudy:
    return PurgedStudy(
        uuid=str(study.uuid),
        facility=study.facility.slug,
        study_date=study.study_date,
        objects=objects,
        bytes=size,
    )


def _study_contents(study: Study) -> tuple[int, int]:
    """The objects and bytes a purge of the study would still free."""
    instances = Instance.objects.filter(series__study=study).aggregate(
        n=Count("pk"), b=Sum("size_bytes")
    )
    reports = Report.objects.filter(study=study).aggregate(
        n=Count("pk", filter=~Q(storage_key="")), b=Sum("size_bytes")
    )
    return instances["n"] + reports["n"], (instances["b"] or 0) + (reports["b"] or 0)


def _study_claim(*, study: Study, now: datetime) -> bool:
    """Mark the study purged if it still may be; the point after which its images may go."""
    with transaction.atomic():
        # The row lock makes the re-check below authoritative: on PostgreSQL, linking the study
        # to a new share (an insert referencing this row) waits for it, and a share committed
        # before it is seen by the re-check, so a share made while the purge ran wins.
        if Study.objects.select_for_update().filter(pk=study.pk).first() is None:
            return False
        if not studies_purgeable(now=now).filter(pk=study.pk).exists():
            return False
        if not Study.objects.filter(pk=study.pk, purged_at__isnull=True).update(purged_at=now):
            return False
        study.purged_at = now
        # The senders' timelines say why the share's images are gone, in the claim's transaction.
        ShareEvent.objects.bulk_create(
            ShareEvent(
                share=share,
                at=now,
                kind=ShareEventKind.PURGED,
                detail="Images deleted after the share ended and the retention period passed.",
            )
            for share in study.shares.all()
        )
        if not study_has_contents(study):
            # Nothing to delete, so no emptying transaction will write the audit event.
            _purge_audit(study=study)
        return True


def study_has_contents(study: Study) -> bool:
    return (
        Instance.objects.filter(series__study=study).exists()
        or Report.objects.filter(study=study).exists()
        or MediaExport.objects.filter(study=study).exists()
    )


def _study_empty(*, study: Study, storage: Storage) -> tuple[int, int]:
    """Delete a claimed study's objects and rows, batch by batch; returns objects and bytes freed.

    Objects go before their rows, so a kill in between leaves rows whose objects may be gone,
    which the next run deletes again harmlessly; never objects without rows, which nothing
    would ever find again.
    """
    objects = freed = 0
    renders = f"renders/{study.facility.uuid}/{study.study_instance_uid}/"
    objects += _prefix_delete(storage, renders)
    # The cached DICOMDIR (and any disc image left without its row) of the study.
    exports = f"exports/{study.facility.uuid}/{study.uuid}/"
    # Disc images made of the study go first (their size is not image bytes: not counted), so
    # the audit event is still written by the batch that deletes the last instance or report.
    for export_pk, key in MediaExport.objects.filter(study=study).values_list("pk", "storage_key"):
        if key:
            objects += _objects_delete(storage, [key])
        MediaExport.objects.filter(pk=export_pk).delete()
    objects += _prefix_delete(storage, exports)
    while True:
        instances = list(
            Instance.objects.filter(series__study=study)
            .order_by("pk")
            .values_list("pk", "storage_key")[:BATCH_SIZE]
        )
        if not instances:
            break
        objects += _objects_delete(storage, [key for _, key in instances])
        freed += _rows_delete(study, Instance.objects.filter(pk__in=[pk for pk, _ in instances]))
    while True:
        reports = list(
            Report.objects.filter(study=study)
            .order_by("pk")
            .values_list("pk", "storage_key")[:BATCH_SIZE]
        )
        if not reports:
            break
        objects += _objects_delete(storage, [key for _, key in reports if key])
        freed += _rows_delete(study, Report.objects.filter(pk__in=[pk for pk, _ in reports]))
    # Again at the end: a render task or a disc image build that was running on the study may
    # have written since.
    objects += _prefix_delete(storage, renders)
    objects += _prefix_delete(storage, exports)
    return objects, freed


def _prefix_delete(storage: Storage, prefix: str) -> int:
    """Delete every object under a folder (renders: frames and thumbnails); returns how many."""
    try:
        folders, files = storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    deleted = 0
    for name in files:
        storage.delete(prefix + name)
        deleted += 1
    for folder in folders:
        deleted += _prefix_delete(storage, f"{prefix}{folder}/")
    return deleted


def _objects_delete(storage: Storage, keys: list[str]) -> int:
    """Delete the objects that still exist; returns how many did."""
    deleted = 0
    for key in keys:
        # exists() first only to count honestly: deleting a missing object is fine either way.
        if storage.exists(key):
            storage.delete(key)
            deleted += 1
    return deleted


def _rows_delete(study: Study, rows: QuerySet[Any]) -> int:
    """Delete rows whose objects are gone and count their bytes on the tombstone, at once."""
    with transaction.atomic():
        # Two runs emptying one study take turns here; the second finds the rows gone.
        Study.objects.select_for_update().filter(pk=study.pk).first()
        size = rows.aggregate(b=Sum("size_bytes"))["b"] or 0
        deleted, _ = rows.delete()
        if not deleted:
            return 0
        Study.objects.filter(pk=study.pk).update(purged_bytes=F("purged_bytes") + size)
        if not study_has_contents(study):
            # The transaction that empties the study writes its audit event: exactly once.
            _purge_audit(study=study)
        return size


def _purge_audit(*, study: Study) -> None:
    tombstone = Study.objects.select_related("facility").get(pk=study.pk)
    study.purged_bytes = tombstone.purged_bytes
    audit_record(
        action=AuditAction.PURGE,
        study=tombstone,
        detail={
            "study": str(tombstone.uuid),
            "bytes_freed": tombstone.purged_bytes,
            "instances": tombstone.num_instances,
        },
    )
    log.info(
        "purged study %s of %s: %d instances, %d bytes freed",
        tombstone.uuid,
        tombstone.facility.slug,
        tombstone.num_instances,
        tombstone.purged_bytes,
    )
