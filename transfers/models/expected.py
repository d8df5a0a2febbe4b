"""Instances a `relay send` run announced before uploading them, so that a partly failed or
killed run does not let its study be called complete (see transfers/completion.py)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from portal.models import Facility


class ExpectedInstance(models.Model):
    """One file the uploader is about to send: its study is not complete until the instance is
    stored with this SHA-256, the sender gives up on it, or the expectation expires
    (RELAY_EXPECTED_HOURS). Keyed by UIDs, not by Study, because the study may not exist yet."""

    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="+")
    study_instance_uid = models.CharField(max_length=64)
    sop_instance_uid = models.CharField(max_length=64)
    sha256 = models.CharField(max_length=64)  # of the file with its preamble zeroed, as stored
    announced_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "sop_instance_uid"], name="expected_unique_per_facility"
            )
        ]
        indexes = [
            models.Index(fields=["facility", "study_instance_uid"], name="expected_study"),
            models.Index(fields=["announced_at"], name="expected_announced"),
        ]

    def __str__(self) -> str:
        return self.sop_instance_uid
