"""Shares lapse: the EXPIRED receipt on each lapsed share's timeline, and a warning e-mail to
its creator a few days before. Both are safe to run twice or on two machines at once (Celery
beat calls them through `transfers.sharing.tasks`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
from django.urls import reverse
from django.utils import timezone

from portal.emails import email_queue

from ..models import Share, ShareEvent, ShareEventKind, ShareKind


def shares_mark_expired(*, now: datetime | None = None) -> int:
    """Write the EXPIRED event on the timeline of every share whose expiry has passed.

    The event is dated at the expiry, so the timeline reads in order however late this runs.
    A share expires once per expiry date: one extended after it lapsed and lapsing again gets a
    second event. A share revoked before its expiry never expires (its REVOKED event says it all).
    Each share is claimed with a row lock that skips shares another run holds, and the event is
    re-checked after the lock, so two runs at once never write it twice. Returns how many events
    were written.
    """
    now = now or timezone.now()
    already = ShareEvent.objects.filter(
        share=OuterRef("pk"), kind=ShareEventKind.EXPIRED, at=OuterRef("expires_at")
    )
    candidates = (
        Share.objects.filter(expires_at__lte=now)
        .filter(Q(revoked_at__isnull=True) | Q(revoked_at__gt=F("expires_at")))
        .exclude(Exists(already))
        .values_list("pk", flat=True)
    )
    marked = 0
    for share_id in list(candidates):
        with transaction.atomic():
            share = Share.objects.select_for_update(skip_locked=True).filter(pk=share_id).first()
            if share is None:  # another run holds it: that run writes the event
                continue
            # A new query after the lock: it sees an event another run committed meanwhile.
            if ShareEvent.objects.filter(
                share=share, kind=ShareEventKind.EXPIRED, at=share.expires_at
            ).exists():
                continue
            ShareEvent.objects.create(
                share=share,
                kind=ShareEventKind.EXPIRED,
                at=share.expires_at,
                detail="the recipient can no longer open it",
            )
            marked += 1
    return marked


def _recipient_label_without_patient_data(share: Share) -> str:
    # A patient link's label carries the patient's e-mail address, which is patient data and
    # stays out of e-mail; a facility's name or a physician's address is not.
    if share.kind == ShareKind.PATIENT:
        return "a patient link"
    return share.recipient_label


def shares_warn_expiring(*, days: int = 3, now: datetime | None = None) -> int:
    """E-mail each active share's creator once, when the share expires within `days` days.

    The warning is claimed with a conditional UPDATE of `expiry_warned_at` in the same
    transaction that queues the e-mail (sent after commit), so two runs never send it twice.
    Extending a share clears `expiry_warned_at` (see `share_extend`), so it is warned again
    before its new expiry. A share made to last `days` days or less is not warned: its creator
    chose the short life a moment ago. The e-mail carries no patient information.
    Returns how many e-mails were queued.
    """
    now = now or timezone.now()
    window = timedelta(days=days)
    due = (
        Share.objects.filter(
            revoked_at__isnull=True,
            expiry_warned_at__isnull=True,
            expires_at__gt=now,
            expires_at__lte=now + window,
        )
        .filter(expires_at__gt=F("created_at") + window)
        .select_related("facility", "created_by", "recipient_facility")
    )
    warned = 0
    for share in due:
        with transaction.atomic():
            claimed = Share.objects.filter(
                pk=share.pk, expiry_warned_at__isnull=True, revoked_at__isnull=True
            ).update(expiry_warned_at=now)
            if not claimed:
                continue
            creator = share.created_by
            if not creator.is_active or not creator.email:
                continue  # claimed anyway: nobody to tell, and nothing to retry
            email_queue(
                name="share_expiring",
                to=creator.email,
                context={
                    "share": share,
                    "recipient": _recipient_label_without_patient_data(share),
                    "num_studies": share.studies.count(),
                    "link": reverse("share_detail", args=[share.uuid]),
                },
            )
            warned += 1
    return warned
