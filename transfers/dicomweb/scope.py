"""Which studies a DICOMweb request may see: the portal's rules, through a session or a token.

- a member of the facility holding a study sees it (and copies it if their role may);
- the recipient of an active share sees its studies (with what the share allows);
- an API token issued for one facility sees only that facility's studies and the shares that
  facility received;
- purged studies are gone.

A search answers from `studies_visible` (one queryset, no per-study query); a retrieval finds
the study by its UID among those and then asks `transfers.access.study_access`, as every
portal page does, for what may be done with it. A study nobody may see is a 404, audited.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest

from portal.audit import audit_record
from portal.models import ApiToken, AuditAction, Facility, Membership, Outcome, User

from ..access import StudyAccess, study_access, study_access_refused
from ..models import ORIGINALS, Share, Study

# A study UID held by more than this many visible copies is looked at in its first few only.
MAX_COPIES = 5


class Need(StrEnum):
    VIEW = "view"  # metadata, frames, bulk data: what the viewer shows
    DOWNLOAD = "download"  # whole instances: a copy, like the ZIP


class DownloadRefused(Exception):
    """The study is visible but the share (or the role) does not allow taking a copy."""


def request_token(request: HttpRequest) -> ApiToken | None:
    return getattr(request, "api_token", None)


def _sources(request: HttpRequest) -> tuple[QuerySet[Membership], QuerySet[Any]]:
    """(the memberships whose facilities' studies the request sees, the ids of the studies
    shared with it)."""
    user: User = request.user  # type: ignore[assignment]
    token = request_token(request)
    memberships = Membership.objects.filter(user=user)
    shares = Share.objects.received_by(user).filter(Q(can_view=True) | Q(can_download=True))
    if token is not None and token.facility_id is not None:
        memberships = memberships.filter(facility_id=token.facility_id)
        shares = shares.filter(recipient_facility_id=token.facility_id)
    shared = Share.studies.through.objects.filter(share__in=shares.values("pk")).values("study_id")
    return memberships, shared


def studies_visible(request: HttpRequest) -> QuerySet[Study]:
    """Every study this request may find: held by a facility the user belongs to, or in an
    active share received by the user (with a right to view or download it); with a facility's
    token, only that facility's own and received ones. Purged studies are not in it."""
    memberships, shared = _sources(request)
    # The facility's own de-identified copies are not among its studies; a recipient finds one
    # through its share.
    return Study.objects.filter(purged_at__isnull=True).filter(
        (Q(facility_id__in=memberships.values("facility_id")) & ORIGINALS) | Q(pk__in=shared)
    )


def facilities_visible(request: HttpRequest) -> QuerySet[Any]:
    """The ids of the facilities holding the studies of `studies_visible` (and maybe a few
    more: it narrows a search, it grants nothing): the user's own facilities and those of the
    studies shared with them, read from the memberships and shares rather than from every
    visible study."""
    memberships, shared = _sources(request)
    return Facility.objects.filter(
        Q(pk__in=memberships.values("facility_id"))
        | Q(pk__in=Study.objects.filter(pk__in=shared).values("facility_id"))
    ).values("pk")


def study_for(request: HttpRequest, study_uid: str, *, need: Need) -> StudyAccess:
    """The request's access to the study with this Study Instance UID, with the right `need`.

    Http404 (audited) when it sees no such study, or may not view it; DownloadRefused (audited)
    when it may view but not copy it. When several copies are visible (the same study held by
    the user's facility and shared by another), the first that allows `need` is taken, the
    facility's own copy first."""
    candidates = list(
        studies_visible(request)
        .filter(study_instance_uid=study_uid)
        .order_by("created_at", "pk")
        .values_list("uuid", flat=True)[:MAX_COPIES]
    )
    if not candidates:
        hidden = Study.objects.filter(study_instance_uid=study_uid, purged_at__isnull=True).first()
        study_access_refused(request, hidden, "not visible to this DICOMweb request", study_uid)
    accesses = [study_access(request, uuid) for uuid in candidates]
    accesses.sort(key=lambda access: not access.is_owner)
    for access in accesses:
        if need == Need.VIEW and access.can_view:
            return access
        if need == Need.DOWNLOAD and access.can_download:
            return access
    first = accesses[0]
    if need == Need.DOWNLOAD:
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            study=first.study,
            outcome=Outcome.FAILURE,
            detail={"reason": "DICOMweb retrieve: the share does not allow downloading"},
        )
        raise DownloadRefused
    study_access_refused(
        request, first.study, "DICOMweb: the share does not allow viewing", study_uid
    )
    raise Http404  # unreachable: study_access_refused raises
