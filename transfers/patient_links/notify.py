"""E-mail to the sending side when a patient link locks after repeated wrong answers.

It goes to the person who made the share and to the sending facility's admins. It carries no
patient information, no token and no PIN: only the facility, when the link was made, the lock,
and a link to the share's page, which is behind sign-in and shows the rest.
"""

from __future__ import annotations

from django.urls import reverse

from portal.emails import email_queue
from portal.models import Membership, Role

from ..models import Share
from ..models.sharing import PATIENT_LINK_ROUNDS, LinkLock


def lock_recipients(share: Share) -> list[str]:
    admins = Membership.objects.filter(
        facility_id=share.facility_id, role=Role.ADMIN, user__is_active=True
    ).values_list("user__email", flat=True)
    creator = [share.created_by.email] if share.created_by.is_active else []
    return sorted({*creator, *admins})


def patient_link_locked_notify(*, share: Share, lock: LinkLock) -> None:
    context = {
        "share": share,
        "lock": lock,
        "rounds": PATIENT_LINK_ROUNDS,
        "link": reverse("share_detail", args=[share.uuid]),
    }
    for address in lock_recipients(share):
        email_queue(name="patient_link_locked", to=address, context=context)
