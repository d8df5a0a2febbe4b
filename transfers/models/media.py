"""Disc images (CD/DVD) of studies."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from .sharing import Share
from .studies import Study


class ExportStatus(models.TextChoices):
    QUEUED = "queued", "Waiting"
    BUILDING = "building", "Building"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class MediaExport(models.Model):
    """A CD/DVD image (ISO 9660 + Joliet) of a study, built by a task and kept in storage
    until the study's images are purged."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="exports")
    share = models.ForeignKey(
        Share, on_delete=models.SET_NULL, null=True, blank=True, related_name="exports"
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    status = models.CharField(
        max_length=10, choices=ExportStatus.choices, default=ExportStatus.QUEUED
    )
    media = models.CharField(max_length=4, blank=True)  # "CD" or "DVD"
    volume_label = models.CharField(max_length=32, blank=True)
    done_bytes = models.PositiveBigIntegerField(default=0)
    total_bytes = models.PositiveBigIntegerField(default=0)
    image_bytes = models.PositiveBigIntegerField(default=0)
    images = models.PositiveIntegerField(default=0)
    storage_key = models.CharField(max_length=400, blank=True)
    error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"Export {self.uuid} ({self.status})"

    @property
    def percent(self) -> int:
        if self.status == ExportStatus.READY:
            return 100
        return int(100 * self.done_bytes / self.total_bytes) if self.total_bytes else 0
