"""The facilities a sender may choose as a recipient: those listed in the directory and those
their facility has already exchanged studies with. Never every facility of the platform, and
never a physician's own practice (its name is the physician's e-mail address)."""

from __future__ import annotations

from django.db.models import Exists, OuterRef, Q, QuerySet

from portal.models import Facility

from ..models import Share


def facility_directory(*, for_facility: Facility) -> QuerySet[Facility]:
    exchanged = Share.objects.filter(
        Q(facility=for_facility, recipient_facility=OuterRef("pk"))
        | Q(facility=OuterRef("pk"), recipient_facility=for_facility)
    )
    return (
        Facility.objects.exclude(pk=for_facility.pk)
        .filter(is_practice=False)
        .filter(Q(listed=True) | Exists(exchanged))
        .order_by("name")
    )
