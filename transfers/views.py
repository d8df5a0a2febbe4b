"""Home, worklist, study page and the browser upload page."""

from __future__ import annotations

from datetime import date, timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.http import Http404, HttpResponse, HttpResponseBadRequest
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from portal.access import AuthedRequest, facilities_of, upload_facilities
from portal.audit import audit_record
from portal.context_processors import current_membership
from portal.models import COPY_ROLES, AuditAction, Outcome

from .access import study_access, study_access_refused
from .completion import expectations_give_up, expected_count
from .deliveries import receiving_facility_of
from .models import ORIGINALS, Push, PushStatus, Share, Study, StudyStatus
from .reports import ReportError, report_attach, report_response, reports_visible

PAGE_SIZE = 25
SORTS = {
    "date": ("-study_date", "-study_time", "-id"),
    "-date": ("study_date", "study_time", "id"),
    "name": ("patient_name", "-study_date", "id"),
    "-name": ("-patient_name", "-study_date", "-id"),
    "received": ("-created_at", "-id"),
    "-received": ("created_at", "id"),
}
# How many rows each section of the home page shows; the Inbox, Sent and the worklist show all.
HOME_ROWS = 10
# A share expiring this soon needs action on the home page: the days before expiry on which
# transfers.sharing.tasks warns the share's creator by e-mail (shares_warn_expiring(days=3)).
EXPIRY_WARNING = timedelta(days=3)
COMMON_MODALITIES = ["CR", "CT", "DX", "MG", "MR", "NM", "OT", "PT", "RF", "SR", "US", "XA"]


def _visible_studies(request: AuthedRequest) -> QuerySet[Study]:
    """Every study the signed-in user may see: those of the facilities they belong to.

    The facilities' ids are read first and written into the query: with `facility_id = 7`
    PostgreSQL reads a worklist page straight off the index in its order (study_fac_date_order);
    with a subquery it reads and sorts every study of the facility (issue 17)."""
    return Study.objects.filter(
        facility_id__in=list(facilities_of(request.user).values_list("pk", flat=True))
    )


def _get_study_for_user(request: AuthedRequest, study_uuid: str) -> Study:
    """A study of one of the user's facilities, or one shared with them by an active share."""
    own = _visible_studies(request).filter(uuid=study_uuid)
    shared = Study.objects.filter(
        shares__in=Share.objects.received_by(request.user), purged_at__isnull=True, uuid=study_uuid
    )
    study = (own | shared).select_related("facility", "uploaded_by").distinct().first()
    if study is None:
        study_access_refused(
            request,
            Study.objects.filter(uuid=study_uuid).select_related("facility").first(),
            "not the holder's and not shared with them",
            study_uuid,
        )
    return study


def _received_studies(request: AuthedRequest) -> QuerySet[Study]:
    """Studies shared with the user by an active share (as _get_study_for_user admits them).

    A semi-join on the shares' study ids rather than a join and DISTINCT: the same studies,
    without sorting whole rows to remove duplicates before the page is cut (issue 17)."""
    shared = Share.studies.through.objects.filter(
        share__in=Share.objects.received_by(request.user)
    ).values("study_id")
    return Study.objects.filter(pk__in=shared, purged_at__isnull=True)


@require_GET
def home(request: AuthedRequest) -> HttpResponse:
    """What is new and what needs doing, for the current facility: studies received (new
    first), and for its senders and admins what they sent and how it fares, uploads still
    arriving, and failed pushes, shares about to expire and studies being reconciled."""
    if not request.user.is_authenticated:
        # As before the home page existed: straight to the sign-in page, with no `next`.
        return redirect("login")
    membership = current_membership(request)
    facility = membership.facility if membership is not None else None

    received_shares = Share.objects.received_by(request.user)
    if facility is not None:
        # Shares to the person themselves, and to the current facility (not their others).
        received_shares = received_shares.filter(
            Q(recipient_facility__isnull=True) | Q(recipient_facility=facility)
        )
    received = list(
        received_shares.select_related("facility")
        .prefetch_related("studies")
        .order_by("-created_at")[:HOME_ROWS]
    )
    context: dict[str, object] = {
        "membership": membership,
        "received": received,
        "can_upload": membership is not None and membership.can_upload,
    }
    shown = [share.uuid for share in received]
    studies_shown: list[Study] = []
    pushes: list[Push] = []
    if facility is not None and membership is not None and membership.role in COPY_ROLES:
        # A push needs action when its last try for that study and destination failed.
        tried_again = Push.objects.filter(
            study=OuterRef("study"),
            destination=OuterRef("destination"),
            created_at__gt=OuterRef("created_at"),
        )
        pushes = list(
            # Pushes into this facility's own PACS: its people can send them again.
            Push.objects.filter(
                destination__facility=facility,
                study__purged_at__isnull=True,
                status__in=(PushStatus.FAILED, PushStatus.PARTIAL),
            )
            .exclude(Exists(tried_again))
            .select_related("study", "destination")
            .order_by("-created_at")[:HOME_ROWS]
        )
        context.update(pushes=pushes, needs_action=bool(pushes))
        studies_shown += [push.study for push in pushes]
    if facility is not None and membership is not None and membership.can_upload:
        now = timezone.now()
        sent = list(
            Share.objects.filter(facility=facility)
            .select_related("recipient_facility")
            .prefetch_related("studies")
            .order_by("-created_at")[:HOME_ROWS]
        )
        arriving = list(
            Study.objects.filter(
                ORIGINALS, facility=facility, status=StudyStatus.RECEIVING, purged_at__isnull=True
            ).order_by("-last_received_at")[:HOME_ROWS]
        )
        expiring = list(
            Share.objects.filter(facility=facility, expires_at__lte=now + EXPIRY_WARNING)
            .active()
            .select_related("recipient_facility")
            .prefetch_related("studies")
            .order_by("expires_at")[:HOME_ROWS]
        )
        reconciling = list(
            Study.objects.filter(
                facility=facility, reconcile_running=True, purged_at__isnull=True
            ).order_by("-last_received_at")[:HOME_ROWS]
        )
        context.update(
            sent=sent,
            arriving=arriving,
            expiring=expiring,
            reconciling=reconciling,
            needs_action=bool(pushes or expiring or reconciling),
            now=now,
        )
        shown += [share.uuid for share in sent + expiring]
        studies_shown += arriving + reconciling
    # The page shows patients' names: one event per page shown, naming what it listed.
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        facility=facility,
        actor_facility=facility,
        detail={
            "page": "home",
            "shares": sorted({str(uuid) for uuid in shown}),
            "studies": sorted({str(study.uuid) for study in studies_shown}),
        },
    )
    return render(request, "transfers/home.html", context)


def _parse_date(value: str) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


@require_GET
@login_required
def study_list(request: AuthedRequest) -> HttpResponse:
    params = request.GET
    if any("\x00" in value for _, values in params.lists() for value in values):
        # PostgreSQL cannot hold a NUL in text; no search has one.
        reason = "A search cannot contain a NUL character."
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            outcome=Outcome.FAILURE,
            detail={"reason": reason, "page": "studies"},
        )
        return HttpResponseBadRequest(reason)
    q = params.get("q", "").strip()[:100]
    modality = params.get("modality", "").strip().upper()[:16]
    date_from = _parse_date(params.get("from", ""))
    date_to = _parse_date(params.get("to", ""))
    sort = params.get("sort", "date")
    if sort not in SORTS:
        sort = "date"

    received = params.get("show") == "received"
    studies = (
        _received_studies(request) if received else _visible_studies(request).filter(ORIGINALS)
    ).select_related("facility")
    searched = bool(q or modality or date_from or date_to)
    if q:
        # The worklist's one search box: patient name (any part), patient ID or accession.
        name_q = q.replace(",", " ").replace("^", " ")
        name_filter = Q()
        for word in name_q.split():
            name_filter &= Q(patient_name__icontains=word)
        studies = studies.filter(
            name_filter | Q(patient_id__iexact=q) | Q(accession_number__iexact=q)
        )
    if modality:
        studies = studies.filter(modalities__contains=f",{modality},")
    if date_from:
        studies = studies.filter(study_date__gte=date_from)
    if date_to:
        studies = studies.filter(study_date__lte=date_to)
    studies = studies.order_by(*SORTS[sort])

    page = Paginator(studies, PAGE_SIZE).get_page(params.get("page"))
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        detail={
            "q": q,
            "modality": modality,
            "page": page.number,
            "count": len(page.object_list),
            "show": "received" if received else "ours",
        },
    )
    query = params.copy()
    query.pop("page", None)
    return render(
        request,
        "transfers/study_list.html",
        {
            "page": page,
            "q": q,
            "modality": modality,
            "date_from": date_from,
            "date_to": date_to,
            "sort": sort,
            "modalities": COMMON_MODALITIES,
            "query": query.urlencode(),
            "can_upload": upload_facilities(request.user).exists(),
            "received": received,
            "searched": searched,
        },
    )


@require_GET
@login_required
def study_detail(request: AuthedRequest, study_uuid: str) -> HttpResponse:
    study = _get_study_for_user(request, study_uuid)
    series = list(study.series.all())
    # What the user may do with the images (none once they are purged: the tombstone stays).
    access = None if study.purged_at is not None else study_access(request, study.uuid)
    audit_record(
        action=AuditAction.STUDY_VIEW,
        request=request,
        study=study,
        actor_facility=receiving_facility_of(
            share=access.share if access else None, user=request.user
        ),
    )
    is_sender = upload_facilities(request.user).filter(pk=study.facility_id).exists()
    # A de-identified copy belongs to its share: shared once, never again.
    is_copy = hasattr(study, "deidentified_copy")
    can_share = (
        study.purged_at is None and is_sender and not study.reconcile_running and not is_copy
    )
    return render(
        request,
        "transfers/study_detail.html",
        {
            "study": study,
            "series_list": series,
            "can_share": can_share,
            "can_view": access is not None and access.can_view,
            "can_download": access is not None and access.can_download,
            "can_import": access is not None and access.can_import,
            "can_reconcile": access is not None and access.is_owner and is_sender,
            "reports": list(reports_visible(access)) if access is not None else [],
            "is_owner": access is not None and access.is_owner,
            # Images a `relay send` announced and has not delivered: the sender may give up.
            "expected_missing": (
                expected_count(study=study)
                if is_sender and study.status == StudyStatus.RECEIVING
                else 0
            ),
        },
    )


@require_POST
@login_required
def study_complete_without(request: AuthedRequest, study_uuid: str) -> HttpResponse:
    """The sender gives up on images a `relay send` announced and never delivered."""
    study = _get_study_for_user(request, study_uuid)
    if not upload_facilities(request.user).filter(pk=study.facility_id).exists():
        study_access_refused(
            request, study, "only the sending facility completes a study", study_uuid
        )
    missing = expectations_give_up(study=study, by=request.user, request=request)
    messages.success(request, f"The study is complete without {missing} announced images.")
    return redirect("study_detail", study_uuid=study.uuid)


@require_POST
@login_required
def report_add(request: AuthedRequest, study_uuid: str) -> HttpResponse:
    study = _get_study_for_user(request, study_uuid)
    if not upload_facilities(request.user).filter(pk=study.facility_id).exists():
        raise Http404("No such study.")
    try:
        report_attach(
            study=study,
            by=request.user,
            text=request.POST.get("text", ""),
            pdf=request.FILES.get("pdf"),
            for_patient=request.POST.get("for_patient") == "on",
            request=request,
        )
    except ReportError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Report attached.")
    return redirect("study_detail", study_uuid=study.uuid)


@require_GET
@login_required
def report_download(request: AuthedRequest, study_uuid: str, report_uuid: str) -> HttpResponseBase:
    return report_response(request, study_access(request, study_uuid), report_uuid)


@require_GET
@login_required
def upload_page(request: AuthedRequest) -> HttpResponse:
    facilities = list(upload_facilities(request.user))
    if not facilities:
        raise Http404("You are not a sender at any facility.")
    membership = current_membership(request)
    return render(
        request,
        "transfers/upload.html",
        {
            "facilities": facilities,
            # The current facility is chosen to start with, when the user may upload there.
            "current_facility": membership.facility if membership is not None else None,
            "max_upload_bytes": settings.RELAY_MAX_UPLOAD_BYTES,
        },
    )
