"""Celery tasks of the rendering pipeline (queue "render", routed in relay/celery.py).

A study is rendered once it is complete: every frame's viewer data and every series' thumbnail
(transfers.viewer.render). The viewer makes whatever is missing on demand, so a render that never ran
costs the first viewer some time, not an image.

Decoding runs under a memory cap in the render worker (`worker_memory_cap`): a file that makes a
decoder ask for more memory gets a MemoryError, which becomes that frame's error, instead of the
kernel's OOM killer taking the worker (and its neighbours) down.
"""

from __future__ import annotations

import logging
import resource

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction

from ..models import Study
from .render import study_render

log = logging.getLogger(__name__)


@shared_task(
    bind=True,
    acks_late=True,
    # Not redelivered when the worker process dies: if a decoder crashed it, redelivery would
    # crash the next one too. What was rendered is kept; the rest is made on demand.
    reject_on_worker_lost=False,
    autoretry_for=(OSError,),
    retry_backoff=30,
    retry_backoff_max=600,
    max_retries=5,
    soft_time_limit=1800,
    time_limit=1860,
)
def study_render_task(self: Task, study_id: int) -> int:
    """Render what is missing of a study. Safe to run twice, or twice at once: renders that
    exist are skipped, and two workers writing the same render write the same bytes."""
    from ..media.export import export_plan_warm  # pydicom: loaded by the render worker only

    study = Study.objects.filter(pk=study_id).first()
    if study is None or study.purged_at is not None:
        return 0
    try:
        made = study_render(study)
    except SoftTimeLimitExceeded:
        # A very large study: what is stored stays, and a fresh run carries on from there.
        log.warning("rendering study %s ran out of time; continuing in a new task", study_id)
        raise self.retry(countdown=1, max_retries=20) from None
    # The DICOMDIR of its ZIP and disc image too, so the first download starts at once.
    export_plan_warm(study=study)
    return made


def study_render_queue(study: Study) -> None:
    """Queue the rendering of a study once the current transaction commits."""
    study_id = study.pk
    transaction.on_commit(lambda: study_render_task.delay(study_id))


def worker_memory_cap(limit_bytes: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at `limit_bytes`, so that an allocation past
    it raises MemoryError in Python instead of the machine swapping or the OOM killer firing.

    Call it in each worker process (Celery's `worker_process_init`), not in the parent. The
    cap counts virtual memory, which is well above the resident size (thread stacks, the
    allocator's arenas, shared libraries), so it should be the worker's baseline plus the largest
    frame it must decode: about 2 GiB suits the 64 Mpx frame limit of transfers.viewer.decode.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))


def worker_memory_cap_from_settings() -> None:
    """Apply settings.RELAY_WORKER_MEMORY_MB (0 or unset: no cap) to this process."""
    megabytes = int(getattr(settings, "RELAY_WORKER_MEMORY_MB", 0) or 0)
    if megabytes > 0:
        worker_memory_cap(megabytes * 1024 * 1024)
        log.info("worker memory capped at %s MiB", megabytes)
