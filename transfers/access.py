"""Who may see a study, by which path, and what they may do with it.

Every page and download that touches a study's images (study page, viewer, frames, ZIP) asks
`study_access` first. There are three ways in:

- a member of the facility that holds the study (uploader, colleague): everything;
- a recipient of an active share (a member of the recipient facility, or the physician it was
  addressed to): what the share allows;
- a patient whose browser session verified the second factor of an active patient link, or a
  physician without an account who entered the code e-mailed for an active guest link: what the
  share allows, through the /p/<token>/ URLs only.

Anything else is a 404 (or the login page, by the views' decorators), never the data. The
share is looked up afresh on every request, so a revoked or expired share stops at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn
from uuid import UUID

from django.db.models import Exists, OuterRef
from django.http import Http404, HttpRequest

from portal.audit import audit_record
from portal.models import COPY_ROLES, AuditAction, Membership, Outcome, Role

from .models import Share, ShareKind, Study

# The session key listing the link shares (patient and guest links) this browser session answered
# the second factor of (written by transfers.patient_links when the answer is right).
PATIENT_SESSION_KEY = "patient_shares"
# Which link (a prefix of its token's hash) each verified share was answered through: a link the
# sender re-issued is a new link, and a browser verified under the old one must answer again.
PATIENT_SESSION_LINKS_KEY = "patient_share_links"


def patient_link_mark(share: Share) -> str:
    return (share.token_hash or "")[:16]


def patient_session_has(*, request: HttpRequest, share: Share) -> bool:
    """Whether this browser session answered the second factor of this patient share, through
    the link the share has now."""
    if share.pk not in request.session.get(PATIENT_SESSION_KEY, []):
        return False
    links = request.session.get(PATIENT_SESSION_LINKS_KEY, {})
    return links.get(str(share.pk)) == patient_link_mark(share)


def study_access_refused(
    request: HttpRequest, study: Study | None, reason: str, study_uuid: UUID | str
) -> NoReturn:
    """Audit a refusal, then answer 404 as for a study that does not exist. A study that exists
    is named, so the facility holding it sees who was refused; the path is not recorded (a
    patient link's token is in it)."""
    audit_record(
        action=AuditAction.ACCESS_DENIED,
        request=request,
        study=study,
        outcome=Outcome.FAILURE,
        detail={"reason": reason, "study": str(study_uuid)},
    )
    raise Http404("No such study.")


@dataclass(frozen=True)
class StudyAccess:
    """A study someone may open, and what they may do with it."""

    study: Study
    # The share that lets them in; None for a member of the facility that holds the study.
    share: Share | None
    can_view: bool
    can_download: bool
    can_import: bool
    # Who it is, for receipts and audit: the user's e-mail or "patient link".
    who: str
    # Every active share that lets them in (a recipient may hold several shares of one study):
    # what they may read of the reports depends on it. Empty for the facility holding it.
    share_ids: frozenset[int] = frozenset()
    # Of those, the shares a patient forwarded from their link, and the patient links they came
    # from: through them a doctor reads what the patient reads (transfers.reports).
    forward_ids: frozenset[int] = frozenset()
    forwarded_from_ids: frozenset[int] = frozenset()

    @property
    def is_patient(self) -> bool:
        return self.share is not None and self.share.kind == ShareKind.PATIENT

    @property
    def is_owner(self) -> bool:
        return self.share is None


def study_access(
    request: HttpRequest, study_uuid: UUID | str, *, token: str | None = None
) -> StudyAccess:
    """The signed-in user's (or, with `token`, the verified patient's) access to one study.

    Raises Http404 when there is none. Purged studies have no images to open: 404 too.
    """
    if token is not None:
        return _patient_access(request, study_uuid, token)
    user = request.user
    if not user.is_authenticated:
        raise Http404("No such study.")
    study = (
        Study.objects.filter(uuid=study_uuid, purged_at__isnull=True)
        .select_related("facility", "uploaded_by")
        .first()
    )
    if study is None:
        study_access_refused(request, None, "no such study", study_uuid)
    membership = Membership.objects.filter(user=user, facility_id=study.facility_id).first()  # type: ignore[misc]
    if membership is not None:
        may_copy = membership.role in COPY_ROLES
        return StudyAccess(
            study=study,
            share=None,
            can_view=True,
            can_download=may_copy,
            can_import=may_copy,
            who=user.email,  # type: ignore[union-attr]
        )
    # A share to a facility where this person is a view-only member lets them view, not copy.
    view_only = Membership.objects.filter(
        user=user, facility=OuterRef("recipient_facility"), role=Role.VIEWER
    )
    # Every active share of the study that reaches them, read once (this runs on every frame).
    shares = list(
        Share.objects.received_by(user)  # type: ignore[arg-type]
        .filter(studies=study)
        .annotate(view_only=Exists(view_only))
        .order_by("-can_download", "-created_at")
    )
    if not shares:
        study_access_refused(
            request, study, "not the holder's and not shared with them", study_uuid
        )
    copying = [share for share in shares if not share.view_only]  # type: ignore[attr-defined]
    return StudyAccess(
        study=study,
        share=shares[0],
        # A share may allow downloading only; another active share of the study may allow more.
        can_view=any(share.can_view for share in shares),
        can_download=any(share.can_download for share in copying),
        can_import=any(share.can_import for share in copying),
        who=user.email,  # type: ignore[union-attr]
        share_ids=frozenset(share.pk for share in shares),
        forward_ids=frozenset(share.pk for share in shares if share.forwarded_from_id),
        forwarded_from_ids=frozenset(
            share.forwarded_from_id for share in shares if share.forwarded_from_id
        ),
    )


def _patient_access(request: HttpRequest, study_uuid: UUID | str, token: str) -> StudyAccess:
    share = Share.objects.link(token)
    if share is None or not patient_session_has(request=request, share=share):
        study_access_refused(request, None, "link not active or not verified", study_uuid)
    study = (
        share.studies.filter(uuid=study_uuid, purged_at__isnull=True)
        .select_related("facility")
        .first()
    )
    if study is None:
        study_access_refused(request, None, "not a study of this patient link", study_uuid)
    return StudyAccess(
        study=study,
        share=share,
        can_view=share.can_view,
        can_download=share.can_download,
        can_import=False,
        who=share.link_label,
        share_ids=frozenset({share.pk}),
        forward_ids=frozenset({share.pk}) if share.forwarded_from_id else frozenset(),
        forwarded_from_ids=(
            frozenset({share.forwarded_from_id}) if share.forwarded_from_id else frozenset()
        ),
    )
