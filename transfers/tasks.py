"""Celery tasks of the study core: completing quiet studies, purging lapsed ones, the scrub.

Each feature package keeps its own tasks beside its services (`sharing.tasks`, `viewer.tasks`,
`dicom.tasks`, `media.tasks`, `reconcile.tasks`); relay/celery.py routes them to their queues.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from . import completion, integrity, purge


@shared_task(soft_time_limit=120, time_limit=180)
def studies_complete_quiet() -> int:
    """Every minute: studies with nothing new for the quiet period are complete."""
    return completion.studies_complete_quiet()


@shared_task(acks_late=True, reject_on_worker_lost=True, soft_time_limit=3300, time_limit=3600)
def purge_expired() -> dict[str, int]:
    """Daily: delete the images of studies whose shares have all lapsed, past retention."""
    result = purge.purge_expired()
    return {
        "studies": result.studies_purged,
        "bytes": result.bytes_freed,
        "objects": result.objects_deleted,
        "failed": len(result.failed),
    }


@shared_task(acks_late=True, reject_on_worker_lost=True, soft_time_limit=3300, time_limit=3600)
def storage_verify_task() -> dict[str, int]:
    """Nightly: the scrub (transfers.integrity.storage_verify), time-boxed; an unfinished pass
    carries on the next night, a finished one e-mails staff its report."""
    run = integrity.storage_verify(seconds=getattr(settings, "RELAY_STORAGE_VERIFY_SECONDS", 3000))
    return {
        "run": run.pk,
        "finished": int(run.finished_at is not None),
        "checked": run.checked,
        "missing": run.missing,
        "corrupt": run.corrupt,
        "extra": run.extra,
    }
