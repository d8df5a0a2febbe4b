"""Celery task of disc images (slow queue)."""

from __future__ import annotations

from celery import shared_task

from ..models import MediaExport
from .discs import media_build


@shared_task(soft_time_limit=3000, time_limit=3600)
def media_build_task(export_id: int) -> str:
    """Build a disc image; running it twice builds once."""
    export = MediaExport.objects.filter(pk=export_id).select_related("study__facility").first()
    if export is None:
        return "gone"
    return media_build(export=export).status
