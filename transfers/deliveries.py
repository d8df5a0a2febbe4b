"""Deliveries: image data leaving Relay for a recipient, announced in one place.

Every path that hands a study's images to someone other than the facility that holds it (viewer
frames, the ZIP and disc-image downloads once their last byte is out, each instance a PACS
accepted from a push) calls `delivery_announce`, inside the transaction that records the
delivery. Listeners of `delivery_made` run in that same transaction; billing meters each delivery
this way (billing.apps connects it), and transfers never imports billing.

What transfers says about a delivery: its kind, a key that names it once (the same content to
the same recipient under the same share has the same key), the share and study, who asked, the
facility that receives the data (a share's recipient facility, a physician's own facility, the
facility owning the PACS of a push; None for a patient), and its size in bytes and images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from django.contrib.auth.models import AnonymousUser
from django.dispatch import Signal

from portal.access import home_facility
from portal.models import Facility, User

from .models import Share, ShareKind, Study

KEY_MAX = 255

# Sent with `delivery=Delivery(...)`; receivers run in the deliverer's transaction, and an error
# in one rolls the delivery back with it (send, not send_robust: a delivery that cannot be
# accounted for is not made).
delivery_made = Signal()


class DeliveryKind(StrEnum):
    VIEWER = "viewer"
    ZIP = "zip"
    ISO = "iso"
    PUSH = "push"
    DICOMWEB = "dicomweb"


@dataclass(frozen=True)
class Delivery:
    kind: DeliveryKind
    key: str
    share: Share
    study: Study
    # Who asked: the recipient, or None for a patient link.
    user: User | None
    # The facility the data goes to; None for a patient or a physician with no facility.
    receiving_facility: Facility | None
    bytes: int
    images: int


def delivery_key(kind: str, *parts: object) -> str:
    """A key naming one delivery, e.g. delivery_key("viewer", share.uuid, user.pk, sop, 0).

    Long keys (many long UIDs) are hashed so that they always fit in 255 characters."""
    key = ":".join(str(part) for part in (kind, *parts))
    if len(key) > KEY_MAX:
        key = f"{kind}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    return key


def receiving_facility_of(
    *, share: Share | None, user: User | AnonymousUser | None
) -> Facility | None:
    """The facility that receives what `user` takes under `share`: the recipient facility of a
    facility share; for a physician, their own facility (the oldest membership, which for an
    invited physician is their practice: `portal.access.home_facility`); None for a patient or a
    physician with none, and None with no share (the holder's own people receive nothing).

    Audit events of a recipient's access pass it as `actor_facility`, so that the admins of the
    facility that received the study see its people's opens, downloads and pushes."""
    if share is None or share.kind == ShareKind.PATIENT:
        return None
    if share.kind == ShareKind.FACILITY and share.recipient_facility_id is not None:
        return share.recipient_facility
    return home_facility(user) if isinstance(user, User) else None


def delivery_announce(
    *,
    kind: DeliveryKind,
    share: Share,
    study: Study,
    user: User | None,
    nbytes: int,
    images: int,
    key_parts: tuple[object, ...],
    to_facility: Facility | None = None,
) -> Delivery:
    """Tell the listeners of `delivery_made` about one delivery, and return it.

    `to_facility` names the receiving facility when the share does not (a push: the facility
    that owns the PACS); otherwise it is the share's, see `receiving_facility_of`.
    """
    if nbytes < 0 or images < 0:
        raise ValueError("a delivery cannot have a negative size")
    delivery = Delivery(
        kind=kind,
        key=delivery_key(kind, *key_parts),
        share=share,
        study=study,
        user=user,
        receiving_facility=to_facility or receiving_facility_of(share=share, user=user),
        bytes=nbytes,
        images=images,
    )
    delivery_made.send(sender=Delivery, delivery=delivery)
    return delivery
