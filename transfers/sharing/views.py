"""Pages of sharing: the share form, the Inbox, the Sent page with receipts, revoke and extend."""

from __future__ import annotations

import uuid
from datetime import datetime, time, timedelta
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files.uploadedfile import UploadedFile
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal.access import AuthedRequest, upload_facilities
from portal.audit import audit_record
from portal.models import AuditAction, Facility

from ..models import SecondFactor, Share, ShareKind, Study
from ..reports import ReportError, report_attach
from .directory import facility_directory
from .services import (
    ShareError,
    patient_link_email,
    share_create,
    share_extend,
    share_open,
    share_revoke,
)


class ShareForm(forms.Form):
    kind = forms.ChoiceField(
        choices=ShareKind.choices,
        widget=forms.RadioSelect,
        initial=ShareKind.FACILITY,
        label="Share with",
    )
    recipient_facility = forms.ModelChoiceField(
        queryset=Facility.objects.none(), required=False, label="Facility"
    )
    recipient_email = forms.EmailField(required=False, label="E-mail")
    message = forms.CharField(
        required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 3})
    )
    expires_on = forms.DateField(
        widget=forms.DateInput(attrs={"type": "date"}), label="Available until"
    )
    can_view = forms.BooleanField(required=False, initial=True, label="View")
    can_download = forms.BooleanField(required=False, initial=True, label="Download")
    can_import = forms.BooleanField(required=False, label="Import to PACS")
    second_factor = forms.ChoiceField(
        choices=[("", "—"), *SecondFactor.choices], required=False, label="Patient's second factor"
    )
    pin = forms.CharField(
        required=False, max_length=12, label="PIN (6 to 12 digits, not the birth date)"
    )
    report_text = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 4}), label="Report (typed)"
    )
    report_pdf = forms.FileField(required=False, label="or report (PDF)")

    def __init__(self, *args: object, facility: Facility, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fields["recipient_facility"].queryset = facility_directory(for_facility=facility)  # type: ignore[attr-defined]
        self.fields["expires_on"].initial = timezone.localdate() + timedelta(
            days=facility.share_default_days
        )


def _expiry(day: object) -> datetime:
    """The end of the chosen day in the portal's time zone."""
    return datetime.combine(day, time(23, 59), tzinfo=timezone.get_current_timezone())  # type: ignore[arg-type]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@require_http_methods(["GET", "POST"])
@login_required
def share_new(request: AuthedRequest) -> HttpResponse:
    uuids = request.GET.getlist("study") or request.POST.getlist("study")
    if not all(_is_uuid(value) for value in uuids):
        raise Http404("No such study among those you may share.")
    facilities = upload_facilities(request.user)
    studies = list(
        Study.objects.filter(
            uuid__in=uuids[:100], facility__in=facilities, purged_at__isnull=True
        ).select_related("facility")
    )
    if not studies or len(studies) != len(set(uuids)):
        raise Http404("No such study among those you may share.")
    facility = studies[0].facility
    form = ShareForm(request.POST or None, request.FILES or None, facility=facility)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            share, raw_token = share_create(
                facility=facility,
                created_by=request.user,
                studies=studies,
                kind=data["kind"],
                recipient_facility=data["recipient_facility"],
                recipient_email=data["recipient_email"] or "",
                message=data["message"],
                expires_at=_expiry(data["expires_on"]),
                can_view=data["can_view"],
                can_download=data["can_download"],
                can_import=data["can_import"],
                second_factor=data["second_factor"],
                pin=data["pin"],
                request=request,
            )
        except ShareError as exc:
            form.add_error(None, str(exc))
        else:
            if data["report_text"] or data["report_pdf"]:
                _attach_reports(request, share, studies, data["report_text"], data["report_pdf"])
            if raw_token:
                # Shown once, on the handout page (and e-mailed if an address was given);
                # only the hash is kept.
                patient_link_email(share=share, raw_token=raw_token)
                request.session[f"patient_link_{share.uuid}"] = raw_token
                return redirect("patient_handout", share_uuid=share.uuid)
            messages.success(request, f"Shared with {share.recipient_label}.")
            return redirect("share_detail", share_uuid=share.uuid)
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        facility=facility,
        detail={"page": "share_new", "studies": [str(study.uuid) for study in studies]},
    )
    return render(
        request,
        "transfers/share_new.html",
        {"form": form, "studies": studies, "facility": facility},
    )


def _attach_reports(
    request: AuthedRequest, share: Share, studies: list[Study], text: str, pdf: UploadedFile | None
) -> None:
    """A report sent with a share is for that share's recipient only (and, on a patient link,
    for the patient, to whom the sender chose to send it)."""
    for study in studies:
        if pdf is not None:
            pdf.seek(0)
        try:
            report_attach(
                study=study,
                by=request.user,
                text=text,
                pdf=pdf,
                share=share,
                for_patient=share.kind == ShareKind.PATIENT,
                request=request,
            )
        except ReportError as exc:
            messages.error(request, f"The share was made, but the report was not attached: {exc}")
            return


@require_GET
@login_required
def inbox(request: AuthedRequest) -> HttpResponse:
    shares = (
        Share.objects.received_by(request.user)
        .select_related("facility", "created_by")
        .prefetch_related("studies")
        .order_by("-created_at")
    )
    page = Paginator(shares, 25).get_page(request.GET.get("page"))
    _audit_list(request, "inbox", page)
    return render(request, "transfers/inbox.html", {"page": page, "query": ""})


def _audit_list(request: AuthedRequest, name: str, page: Any) -> None:
    """A page listing shares shows their studies' patients: one event per page shown."""
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        detail={
            "page": name,
            "page_number": page.number,
            "shares": [str(share.uuid) for share in page.object_list],
        },
    )


def _sent_shares(request: AuthedRequest):  # type: ignore[no-untyped-def]
    return Share.objects.filter(facility__in=upload_facilities(request.user))


@require_GET
@login_required
def sent(request: AuthedRequest) -> HttpResponse:
    shares = (
        _sent_shares(request)
        .select_related("facility", "recipient_facility", "created_by")
        .prefetch_related("studies", "events")
        .order_by("-created_at")
    )
    page = Paginator(shares, 25).get_page(request.GET.get("page"))
    _audit_list(request, "sent", page)
    return render(
        request, "transfers/sent.html", {"page": page, "query": "", "now": timezone.now()}
    )


def _get_share_for_user(request: AuthedRequest, share_uuid: str) -> tuple[Share, bool]:
    """The share and whether the user is on the sending side; 404 for anyone else, and for a
    recipient once the share is revoked or expired."""
    share = (
        Share.objects.select_related("facility", "recipient_facility", "created_by")
        .filter(uuid=share_uuid)
        .first()
    )
    if share is None:
        raise Http404("No such share.")
    if share.facility in upload_facilities(request.user):
        return share, True
    if share.is_active and Share.objects.received_by(request.user).filter(pk=share.pk).exists():
        return share, False
    raise Http404("No such share.")


@require_GET
@login_required
def share_detail(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    share, is_sender = _get_share_for_user(request, share_uuid)
    if not is_sender:
        share_open(share=share, who=request.user.email, request=request, actor=request.user)
    else:
        # The recipient's opening is audited as share_open; the sender's look is audited here.
        audit_record(
            action=AuditAction.STUDY_LIST,
            request=request,
            facility=share.facility,
            detail={"page": "share", "share": str(share.uuid)},
        )
    return render(
        request,
        "transfers/share_detail.html",
        {
            "share": share,
            "is_sender": is_sender,
            "studies": share.studies.filter(purged_at__isnull=True),
            "events": share.events.all(),
        },
    )


@require_POST
@login_required
def share_revoke_view(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    share, is_sender = _get_share_for_user(request, share_uuid)
    if not is_sender:
        raise Http404("No such share.")
    share_revoke(share=share, by=request.user, request=request)
    messages.success(request, "The share is revoked: it stopped working for everyone at once.")
    return redirect("share_detail", share_uuid=share.uuid)


@require_POST
@login_required
def share_extend_view(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    share, is_sender = _get_share_for_user(request, share_uuid)
    if not is_sender:
        raise Http404("No such share.")
    field = forms.DateField()
    try:
        day = field.clean(request.POST.get("expires_on"))
        share_extend(share=share, by=request.user, expires_at=_expiry(day), request=request)
    except (forms.ValidationError, ShareError) as exc:
        messages.error(
            request, exc.messages[0] if isinstance(exc, forms.ValidationError) else str(exc)
        )
    else:
        messages.success(request, "The expiry was changed.")
    return redirect("share_detail", share_uuid=share.uuid)
