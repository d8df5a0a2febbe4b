"""Pages of patient links: the sender's printable handout, and the patient's own pages.

The patient pages need no account: the token in the address finds the share, the second factor
unlocks it for this browser session. Every way a link can be wrong (unknown, revoked, expired,
not a patient link) answers the same 404 page, so a guesser learns nothing.
"""

from __future__ import annotations

import segno
from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal.access import AuthedRequest, upload_facilities
from portal.audit import audit_record
from portal.models import AuditAction

from ..access import patient_session_has, study_access
from ..models import SecondFactor, Share, ShareKind
from ..reports import report_response, reports_for
from .services import (
    FactorResult,
    patient_factor_check,
    patient_session_grant,
    patient_share_locked_until,
    patient_studies_view,
)


class BirthDateForm(forms.Form):
    birth_date = forms.DateField(
        label="Your date of birth",
        input_formats=["%Y-%m-%d"],
        widget=forms.DateInput(attrs={"type": "date", "autocomplete": "bday"}, format="%Y-%m-%d"),
    )


class PinForm(forms.Form):
    pin = forms.CharField(
        label="PIN",
        max_length=12,
        widget=forms.PasswordInput(attrs={"inputmode": "numeric", "autocomplete": "off"}),
    )


def _not_found(request: HttpRequest) -> HttpResponse:
    return render(request, "transfers/patient_not_found.html", status=404)


def _get_handout_share_for_user(request: AuthedRequest, share_uuid: str) -> Share:
    """A patient share of a facility the user sends for; 404 for anyone else."""
    share = (
        Share.objects.filter(
            uuid=share_uuid,
            kind=ShareKind.PATIENT,
            facility__in=upload_facilities(request.user),
        )
        .select_related("facility")
        .first()
    )
    if share is None:
        raise Http404("No such share.")
    return share


@require_GET
@login_required
@never_cache  # the page carries the raw token: no browser or proxy may keep a copy
def patient_handout(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    share = _get_handout_share_for_user(request, share_uuid)
    # The raw token exists only here, once; after this page only its hash is left anywhere.
    raw_token = request.session.pop(f"patient_link_{share.uuid}", None)
    link = qr_svg = None
    if raw_token:
        link = settings.SITE_URL + reverse("patient_open", kwargs={"token": raw_token})
        # segno makes the SVG from our own URL (token characters are URL-safe base64), so
        # there is nothing in it a visitor chose.
        qr_svg = mark_safe(  # noqa: S308
            segno.make(link, error="m").svg_inline(scale=5, title="QR code of the patient link")
        )
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        facility=share.facility,
        detail={"page": "handout", "share": str(share.uuid), "link_shown": bool(raw_token)},
    )
    return render(
        request,
        "transfers/patient_handout.html",
        {
            "share": share,
            "link": link,
            "qr_svg": qr_svg,
            "uses_pin": share.second_factor == SecondFactor.PIN,
            "studies": share.studies.all(),
        },
    )


@require_http_methods(["GET", "POST"])
@never_cache
def patient_open(request: HttpRequest, token: str) -> HttpResponse:
    share = Share.objects.patient_link(token)
    if share is None:
        return _not_found(request)
    if request.method == "GET" and patient_session_has(request=request, share=share):
        return redirect("patient_studies", token=token)

    uses_pin = share.second_factor == SecondFactor.PIN
    form: forms.Form = (PinForm if uses_pin else BirthDateForm)(request.POST or None)
    result: FactorResult | None = None
    locked_until = None
    if request.method == "POST" and form.is_valid():
        result = patient_factor_check(
            share=share,
            request=request,
            birth_date=form.cleaned_data.get("birth_date"),
            pin=form.cleaned_data.get("pin", ""),
        )
        if result.ok:
            patient_session_grant(request=request, share=share)
            return redirect("patient_studies", token=token)
        locked_until = result.locked_until
    elif request.method == "GET":
        locked_until = patient_share_locked_until(share=share)
    status = 200 if request.method == "GET" or result is None else 403
    return render(
        request,
        "transfers/patient_open.html",
        {
            "share": share,
            "form": form,
            "uses_pin": uses_pin,
            "result": result,
            "locked_until": locked_until,
        },
        status=status,
    )


@require_GET
@never_cache
def patient_studies(request: HttpRequest, token: str) -> HttpResponse:
    # The share is looked up afresh on every page: revoked or expired stops a verified session.
    share = Share.objects.patient_link(token)
    if share is None:
        return _not_found(request)
    if not patient_session_has(request=request, share=share):
        return redirect("patient_open", token=token)
    patient_studies_view(share=share, request=request)
    studies = list(share.studies.filter(purged_at__isnull=True))
    for study in studies:
        # Only the reports marked for the patient, of this link or of the study as a whole.
        study.patient_reports = list(reports_for(study, share_ids={share.pk}, patient=True))  # type: ignore[attr-defined]
    return render(request, "transfers/patient_studies.html", {"share": share, "studies": studies})


@require_GET
@never_cache
def patient_report_download(
    request: HttpRequest, token: str, study_uuid: str, report_uuid: str
) -> HttpResponseBase:
    access = study_access(request, study_uuid, token=token)
    return report_response(request, access, report_uuid)


@require_POST
def patient_sign_out(request: HttpRequest, token: str) -> HttpResponse:
    """Forget every patient link this browser session opened (a shared or public computer);
    the link asks for its second factor again."""
    request.session.flush()
    return redirect("patient_open", token=token)
