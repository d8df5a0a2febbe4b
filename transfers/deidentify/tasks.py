"""Celery task of de-identified sharing: making a copy (reads and writes a whole study)."""

from __future__ import annotations

from celery import shared_task


@shared_task(acks_late=True, reject_on_worker_lost=True, soft_time_limit=3300, time_limit=3600)
def deidentified_copy_make(mapping_id: int) -> str:
    """Fill one de-identified copy; safe to run twice (what is stored already is a duplicate)."""
    # Imported here, not with the module: every process registers this task at start-up, and
    # the services load pydicom and dicom-anonymizer's tables, which only the slow worker needs.
    from . import services

    return services.deidentified_copy_make(mapping_id=mapping_id)
