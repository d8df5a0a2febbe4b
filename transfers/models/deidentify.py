"""De-identified copies: a study made anew without the patient's identity, for one share.

The copy is an ordinary Study of the sending facility (its own UIDs, series, instances, stored
and hashed like any upload), so the viewer, the ZIP and the push work on it unchanged. This row
marks it as a copy and is its mapping: which original it came from, the pseudonym, the date
offset and every original UID with its new one. The mapping stays at the sending facility:
only its senders and admins see it (on the share's page), never a recipient.

A copy never shows among the facility's own studies (worklist, home, search, DICOMweb, C-FIND):
those ask `ORIGINALS`. It belongs to its share and is purged when the share lapses (revoked or
expired), whatever the retention (transfers.purge).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.models import Facility

from .sharing import Share
from .studies import Study

# The facility's own studies, without its de-identified copies: every list of "our studies"
# filters with it (`Study.objects.filter(ORIGINALS)`, or `& ORIGINALS` inside a Q).
ORIGINALS = Q(deidentified_copy__isnull=True)


class CopyStatus(models.TextChoices):
    MAKING = "making", "Being made"
    DONE = "done", "Made"
    FAILED = "failed", "Failed"


class DeidentifiedCopy(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    study = models.OneToOneField(Study, on_delete=models.CASCADE, related_name="deidentified_copy")
    # PROTECT: a mapping never loses its original while the copy exists (studies are not deleted,
    # a purge leaves the row as a tombstone).
    original = models.ForeignKey(
        Study, on_delete=models.PROTECT, related_name="deidentified_copies"
    )
    share = models.ForeignKey(
        Share, on_delete=models.CASCADE, null=True, blank=True, related_name="deidentified_copies"
    )
    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=8, choices=CopyStatus.choices, default=CopyStatus.MAKING)
    error = models.CharField(max_length=300, blank=True)
    # The options of PS3.15 Annex E the sender chose.
    retain_dates = models.BooleanField(default=False)
    clean_descriptors = models.BooleanField(default=False)
    retain_device = models.BooleanField(default=False)
    # The keys of the copy: every date moved by this many days (with retain_dates), the UIDs
    # derived with this secret, the patient called by this pseudonym.
    date_offset_days = models.IntegerField(default=0)
    uid_key = models.CharField(max_length=64)
    patient_name = models.CharField(max_length=64)
    patient_id = models.CharField(max_length=64)
    # original UID -> new UID, for every UID the copy remapped (study, series, instances,
    # frames of reference, references).
    uid_map = models.JSONField(default=dict, blank=True)
    # Series the sender was warned may carry burned-in text and confirmed: [{uid, label, why}].
    burned_in_series = models.JSONField(default=list, blank=True)
    # Instances left out: they say their pixels carry burned-in text and their series was not
    # among those the sender confirmed.
    withheld = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ("created_at", "id")

    def __str__(self) -> str:
        return f"De-identified copy {self.patient_name} of study {self.original_id}"

    @property
    def options(self) -> frozenset[str]:
        return frozenset(
            name
            for name in ("retain_dates", "clean_descriptors", "retain_device")
            if getattr(self, name)
        )
