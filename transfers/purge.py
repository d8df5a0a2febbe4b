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
    Renders and exports, once they exist, go in `_studies_empty` the same way.
    Stays, as the tombstone: the Study row (patient, date, description, counts, size) with
    `purged_at` and `purged_bytes`, its Series rows (what each series was), every share and its
    timeline, and the whole audit trail, plus one PURGE audit event with the bytes freed.

Surviving a kill halfway
    A purge has two steps, taken for a group of studies at a time (GROUP_SIZE) so that a run's
    round trips to the database are paid per batch of rows rather than per study. The *claim* is
    one short transaction: lock the group's study rows, re-check which are still purgeable (a
    share made meanwhile wins) and set their `purged_at`. From that commit on, each is a
    tombstone to everyone: it cannot be shared, attached to, or found in an inbox. The *emptying*
    then works in batches of rows across the group: delete the batch's objects from storage (a
    missing object is fine, an earlier run may have deleted it), then in one transaction delete
    the batch's rows and add their sizes to each study's `purged_bytes`. The transaction that
    removes a study's last row also writes its PURGE audit event, so it is written exactly once.
    A study with `purged_at` set that still has rows is unfinished work: every run first finishes
    those, then claims new ones.
    A kill at any point therefore leaves either an unclaimed study (nothing deleted) or a claimed
    one that the next run empties; a row is counted in `purged_bytes` only in the transaction
    that deletes it, so bytes are never counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import reduce
from operator import or_

from django.core.files.storage import Storage, storages
from django.db import transaction
from django.db.models import (
    Case,
    Count,
    Exists,
    F,
    OuterRef,
    PositiveBigIntegerField,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.utils import timezone

from portal.audit import audit_event
from portal.models import AuditAction, AuditEvent, Facility

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

# Rows (and objects) handled per transaction while emptying: small enough that a kill loses
# little work and no lock is held for long, large enough for few round trips.
BATCH_SIZE = 500
# Studies claimed in one transaction and then emptied together, their rows batched across the
# group: a run pays its round trips per batch of rows, not per study (bench/purge_scale.py: 1
# million instances of 10,000 studies).
GROUP_SIZE = 100


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


def studies_purgeable(*, now: datetime, periods: Iterable[int] | None = None) -> QuerySet[Study]:
    """Studies whose images may be purged at `now` (see the module docstring for the rule).

    `periods` are the facilities' distinct retention periods, when the caller has them (a run
    asks once, not per study: a period set meanwhile only makes its studies wait a run)."""
    live_share = Share.objects.filter(
        studies=OuterRef("pk"), revoked_at__isnull=True, expires_at__gt=now
    )
    # Retention is per facility; one condition per distinct retention period keeps it one query.
    if periods is None:
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
    ones, GROUP_SIZE studies at a time. A group that fails (storage unreachable) is logged, its
    unfinished studies are reported in `failed` and left claimed for the next run; the other
    groups go ahead. With `dry_run` nothing changes and the result lists what would go. A second
    run frees nothing.
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
    periods = _retention_periods()
    with ThreadPoolExecutor(DELETE_THREADS, thread_name_prefix="purge-delete") as pool:
        for studies, claim in ((unfinished, False), (fresh, True)):
            for start in range(0, len(studies), GROUP_SIZE):
                _group_purge(
                    studies[start : start + GROUP_SIZE],
                    claim=claim,
                    now=now,
                    periods=periods,
                    storage=storage,
                    pool=pool,
                    into=result,
                )
    return result


@dataclass
class _Tally:
    """What emptying a group did to each of its studies (by primary key)."""

    objects: dict[int, int] = field(default_factory=dict)
    freed: dict[int, int] = field(default_factory=dict)
    emptied: set[int] = field(default_factory=set)

    def add(self, counts: dict[int, int], study_id: int, n: int) -> None:
        counts[study_id] = counts.get(study_id, 0) + n


def _group_purge(
    studies: list[Study],
    *,
    claim: bool,
    now: datetime,
    periods: list[int],
    storage: Storage,
    pool: Executor,
    into: PurgeResult,
) -> None:
    """Claim (unless already claimed) and empty a group of studies; add them to the result."""
    tally = _Tally()
    try:
        if claim:
            claimed = _studies_claim(
                studies=studies, now=now, periods=periods, emptied=tally.emptied
            )
            # The others had a share made meanwhile, or another run took them.
            studies = [study for study in studies if study.pk in claimed]
        if studies:
            _studies_empty(studies=studies, storage=storage, tally=tally, pool=pool)
    except Exception as exc:
        log.exception(
            "purge of %d studies (from %s) stopped; the next run finishes them",
            len(studies),
            studies[0].uuid if studies else "-",
        )
        error = f"{type(exc).__name__}: {exc}"[:300]
        for study in studies:
            if study.pk in tally.emptied:
                into.studies.append(_study_summary(study, tally))
            else:
                into.failed.append((str(study.uuid), error))
        return
    into.studies.extend(_study_summary(study, tally) for study in studies)


def _study_summary(study: Study, tally: _Tally) -> PurgedStudy:
    return _summary(
        study, objects=tally.objects.get(study.pk, 0), size=tally.freed.get(study.pk, 0)
    )


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


def _retention_periods() -> list[int]:
    return list(Facility.objects.values_list("retention_days", flat=True).distinct())


def _study_claim(*, study: Study, now: datetime, periods: Iterable[int] | None = None) -> bool:
    """Mark the study purged if it still may be; the point after which its images may go."""
    periods = _retention_periods() if periods is None else list(periods)
    return study.pk in _studies_claim(studies=[study], now=now, periods=periods)


def _studies_claim(
    *, studies: list[Study], now: datetime, periods: list[int], emptied: set[int] | None = None
) -> set[int]:
    """Mark the studies purged that still may be, in one transaction; their primary keys.
    Those that held nothing to delete are done at once (audited), and added to `emptied`."""
    ids = sorted(study.pk for study in studies)
    with transaction.atomic():
        # The row locks make the re-check below authoritative: on PostgreSQL, linking a study
        # to a new share (an insert referencing its row) waits for them, and a share committed
        # before them is seen by the re-check, so a share made while the purge ran wins. Taken
        # in id order, as every run takes them, so two runs never wait on each other in a ring.
        list(Study.objects.select_for_update().filter(pk__in=ids).order_by("pk").values_list("pk"))
        still = set(
            studies_purgeable(now=now, periods=periods)
            .filter(pk__in=ids)
            .values_list("pk", flat=True)
        )
        if not still:
            return still
        Study.objects.filter(pk__in=still, purged_at__isnull=True).update(purged_at=now)
        for study in studies:
            if study.pk in still:
                study.purged_at = now
        # The senders' timelines say why the share's images are gone, in the claim's transaction.
        ShareEvent.objects.bulk_create(
            ShareEvent(
                share_id=share_id,
                at=now,
                kind=ShareEventKind.PURGED,
                detail="Images deleted after the share ended and the retention period passed.",
            )
            for share_id in Share.studies.through.objects.filter(study_id__in=still)
            .order_by("study_id", "share_id")
            .values_list("share_id", flat=True)
        )
        # Nothing to delete: no emptying transaction will write their audit events.
        empty = still - studies_with_contents(still)
        _purge_audit(study_ids=empty)
        if emptied is not None:
            emptied |= empty
        return still


def studies_with_contents(study_ids: Iterable[int]) -> set[int]:
    """Those of the studies that still hold images, reports or disc images (one query)."""
    return set(
        Study.objects.filter(pk__in=list(study_ids))
        .filter(
            Exists(Instance.objects.filter(series__study=OuterRef("pk")))
            | Exists(Report.objects.filter(study=OuterRef("pk")))
            | Exists(MediaExport.objects.filter(study=OuterRef("pk")))
        )
        .values_list("pk", flat=True)
    )


def study_has_contents(study: Study) -> bool:
    """Whether any of the study's images, reports or disc images is left."""
    return bool(studies_with_contents([study.pk]))


def _studies_empty(
    *, studies: list[Study], storage: Storage, tally: _Tally, pool: Executor | None = None
) -> None:
    """Delete claimed studies' objects and rows, batch by batch across the group.

    Objects go before their rows, so a kill in between leaves rows whose objects may be gone,
    which the next run deletes again harmlessly; never objects without rows, which nothing
    would ever find again.
    """
    ids = [study.pk for study in studies]

    def folders() -> None:
        for study in studies:
            # Renders, and the cached DICOMDIR (and any disc image left without its row).
            for prefix in (
                f"renders/{study.facility.uuid}/{study.study_instance_uid}/",
                f"exports/{study.facility.uuid}/{study.uuid}/",
            ):
                tally.add(tally.objects, study.pk, _prefix_delete(storage, prefix))

    # Disc images made of the studies go first (their size is not image bytes: not counted), so
    # the audit event is still written by the batch that deletes the last instance or report.
    exports = MediaExport.objects.filter(study_id__in=ids).order_by("pk")
    for export_pk, study_id, key in exports.values_list("pk", "study_id", "storage_key"):
        if key and _object_delete(storage, key):
            tally.add(tally.objects, study_id, 1)
        MediaExport.objects.filter(pk=export_pk).delete()
    folders()
    # No order asked: any BATCH_SIZE rows of the group will do, and PostgreSQL then stops
    # reading at the batch's last row instead of sorting what is left of the group each time.
    instances = Instance.objects.filter(series__study_id__in=ids).order_by()
    while batch := list(
        instances.values_list("pk", "storage_key", "series__study_id", "size_bytes")[:BATCH_SIZE]
    ):
        _batch_delete(Instance, batch, storage=storage, tally=tally, pool=pool)
    reports = Report.objects.filter(study_id__in=ids).order_by()
    while batch := list(
        reports.values_list("pk", "storage_key", "study_id", "size_bytes")[:BATCH_SIZE]
    ):
        _batch_delete(Report, batch, storage=storage, tally=tally, pool=pool)
    # Again at the end: a render task or a disc image build that was running on a study may
    # have written since.
    folders()


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


def _object_delete(storage: Storage, key: str) -> bool:
    """Delete the object if it still exists; whether it did."""
    # exists() first only to count honestly: deleting a missing object is fine either way.
    if storage.exists(key):
        storage.delete(key)
        return True
    return False


# A batch's objects are deleted by this many threads at once (each delete waits on the disk's
# journal or on a round trip to the bucket, not on Python), once a batch has POOL_FROM of them.
DELETE_THREADS = 8
POOL_FROM = 32


def _batch_delete(
    model: type[Instance] | type[Report],
    batch: list[tuple[int, str, int, int]],
    *,
    storage: Storage,
    tally: _Tally,
    pool: Executor | None,
) -> None:
    """One batch of rows (pk, storage key, study, size): their objects, then the rows."""
    keyed = [(study_id, key) for _, key, study_id, _ in batch if key]
    if pool is not None and len(keyed) >= POOL_FROM:
        gone = list(pool.map(lambda item: _object_delete(storage, item[1]), keyed))
    else:
        gone = [_object_delete(storage, key) for _, key in keyed]
    for (study_id, _), deleted in zip(keyed, gone, strict=True):
        if deleted:
            tally.add(tally.objects, study_id, 1)
    _rows_delete(model, batch, tally)


def _rows_delete(
    model: type[Instance] | type[Report], batch: list[tuple[int, str, int, int]], tally: _Tally
) -> None:
    """Delete rows whose objects are gone and count their bytes on the tombstones, at once; the
    transaction that empties a study writes its audit event."""
    study_ids = sorted({study_id for _, _, study_id, _ in batch})
    with transaction.atomic():
        # Two runs emptying the same studies take turns here (locking in id order, so never in
        # a ring); the second finds the rows gone and counts nothing.
        list(
            Study.objects.select_for_update()
            .filter(pk__in=study_ids)
            .order_by("pk")
            .values_list("pk")
        )
        present = set(
            model.objects.filter(pk__in=[row[0] for row in batch]).values_list("pk", flat=True)
        )
        if not present:
            return
        sizes: dict[int, int] = {}
        for pk, _, study_id, size in batch:
            if pk in present:
                sizes[study_id] = sizes.get(study_id, 0) + size
        # Only the ids: the rows are not needed to delete them (and their push records).
        model.objects.filter(pk__in=present).only("pk").delete()
        Study.objects.filter(pk__in=list(sizes)).update(
            purged_bytes=F("purged_bytes")
            + Case(
                *(When(pk=study_id, then=Value(size)) for study_id, size in sizes.items()),
                default=Value(0),
                output_field=PositiveBigIntegerField(),
            )
        )
        for study_id, size in sizes.items():
            tally.add(tally.freed, study_id, size)
        # Exactly once: only this transaction sees each of these studies go empty.
        emptied = set(sizes) - studies_with_contents(sizes)
        _purge_audit(study_ids=emptied)
        tally.emptied |= emptied


def _purge_audit(*, study_ids: set[int]) -> None:
    if not study_ids:
        return
    tombstones = list(
        Study.objects.select_related("facility").filter(pk__in=study_ids).order_by("pk")
    )
    AuditEvent.objects.bulk_create(
        audit_event(
            action=AuditAction.PURGE,
            study=tombstone,
            detail={
                "study": str(tombstone.uuid),
                "bytes_freed": tombstone.purged_bytes,
                "instances": tombstone.num_instances,
            },
        )
        for tombstone in tombstones
    )
    for tombstone in tombstones:
        log.info(
            "purged study %s of %s: %d instances, %d bytes freed",
            tombstone.uuid,
            tombstone.facility.slug,
            tombstone.num_instances,
            tombstone.purged_bytes,
        )
