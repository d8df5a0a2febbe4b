"""What every DICOMweb view answers the same way: plain-text refusals, UID checks, the user of a
request (session or token), and the metering of one delivery per request."""

from __future__ import annotations

from typing import cast

from django.http import HttpRequest, HttpResponse

from portal.models import User

from ..access import StudyAccess
from ..deliveries import DeliveryKind, delivery_announce
from ..uids import is_valid_uid


def text_answer(reason: str, status: int) -> HttpResponse:
    return HttpResponse(reason, status=status, content_type="text/plain; charset=utf-8")


def uids_refused(*values: str) -> HttpResponse | None:
    """A 400 naming the first value that is not a DICOM UID, or None when all are."""
    for value in values:
        if not is_valid_uid(value):
            return text_answer(f"Not a DICOM UID: {value[:70]!r}.", 400)
    return None


def request_user(request: HttpRequest) -> User | None:
    return cast(User, request.user) if request.user.is_authenticated else None


def delivery_meter(
    request: HttpRequest,
    access: StudyAccess,
    *,
    images: int,
    nbytes: int,
    key_parts: tuple[object, ...],
) -> None:
    """One DICOMweb delivery for the request (none for the holder's own people); the key makes
    the same content to the same recipient count once."""
    if access.share is None:
        return
    user = request_user(request)
    delivery_announce(
        kind=DeliveryKind.DICOMWEB,
        share=access.share,
        study=access.study,
        user=user,
        nbytes=nbytes,
        images=images,
        key_parts=(access.share.uuid, user.pk if user else "patient", *key_parts),
    )
