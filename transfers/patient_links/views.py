"""Pages of patient links: the sender's printable handout, unlock and re-issue, and the
patient's own pages.

The patient pages need no account: the token in the address finds the share, the second factor
unlocks it for this browser session. Every way a link can be wrong (unknown, revoked, expired,
not a patient link) answers the same 404 page, so a guesser learns nothing. A locked link says
so and for how long; an address that sent too many wrong answers gets a 429 page.
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal.access import AuthedRequest, upload_facilities
from portal.audit import audit_record
from portal.models import AuditAction, Outcome

from ..access import patient_session_has, study_access
from ..models import SecondFactor, Share, ShareKind
from ..reports import report_response, reports_for_share, reports_visible
from ..sharing.services import ShareError, share_forward, share_revoke
from .blocked import address_blocked_response
from .services import (
    FactorResult,
    patient_factor_check,
    patient_link_lock,
    patient_link_reissue,
    patient_link_unlock,
    patient_session_grant,
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


def _not_found(
    request: HttpRequest, reason: str = "unknown, revoked or expired link"
) -> HttpResponse:
    """The one page for every bad link; the refusal is audited, without the token or path."""
    audit_record(
        action=AuditAction.ACCESS_DENIED,
        request=request,
        outcome=Outcome.FAILURE,
        detail={"reason": reason, "what": "patient link"},
    )
    return render(request, "transfers/patient_not_found.html", status=404)


def _get_handout_share_for_user(request: AuthedRequest, share_uuid: str, page: str) -> Share:
    """A patient share of a facility the user sends for (admin or sender, as for revoke and
    extend); 404 for anyone else, audited so the sending facility sees who tried."""
    share = Share.objects.filter(uuid=share_uuid).select_related("facility").first()
    if (
        share is None
        # A guest link (a physician's) has no handout and is not re-issued; it can be unlocked.
        or not (share.kind == ShareKind.PATIENT or (share.is_guest_link and page == "unlock"))
        or not upload_facilities(request.user).filter(pk=share.facility_id).exists()
    ):
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            facility=share.facility if share is not None else None,
            outcome=Outcome.FAILURE,
            detail={
                "reason": "not a sender of the patient link's facility",
                "share": str(share_uuid),
                "page": page,
            },
        )
        raise Http404("No such share.")
    return share


@require_GET
@login_required
@never_cache  # the page carries the raw token: no browser or proxy may keep a copy
def patient_handout(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    share = _get_handout_share_for_user(request, share_uuid, "handout")
    # The raw token exists only here, once; after this page only its hash is left anywhere.
    # So does a PIN Relay chose when the link was re-issued.
    raw_token = request.session.pop(f"patient_link_{share.uuid}", None)
    new_pin = request.session.pop(f"patient_pin_{share.uuid}", None)
    link = qr_svg = None
    if raw_token:
        import segno  # only the handout page draws a QR code

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
        detail={
            "page": "handout",
            "share": str(share.uuid),
            "link_shown": bool(raw_token),
            # Only after a re-issue, when Relay chose the PIN.
            **({"pin_shown": True} if new_pin else {}),
        },
    )
    return render(
        request,
        "transfers/patient_handout.html",
        {
            "share": share,
            "link": link,
            "qr_svg": qr_svg,
            "new_pin": new_pin,
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

    if request.method == "POST":
        blocked = address_blocked_response(request, share)
        if blocked is not None:
            return blocked

    uses_pin = share.second_factor == SecondFactor.PIN
    form: forms.Form = (PinForm if uses_pin else BirthDateForm)(request.POST or None)
    result: FactorResult | None = None
    lock = None
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
        lock = result.lock
    elif request.method == "GET":
        lock = patient_link_lock(share=share)
    status = 200 if request.method == "GET" or result is None else 403
    return render(
        request,
        "transfers/patient_open.html",
        {
            "share": share,
            "form": form,
            "uses_pin": uses_pin,
            "result": result,
            "lock": lock,
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
    return _studies_page(request, share, ForwardForm(share=share))


def _studies_page(
    request: HttpRequest, share: Share, forward_form: forms.Form, status: int = 200
) -> HttpResponse:
    """The patient's list of studies, with the forward form (fresh, or refused and shown again)."""
    studies = list(share.studies.filter(purged_at__isnull=True))
    for study in studies:
        # Only the reports marked for the patient, of this link or of the study as a whole.
        study.patient_reports = list(reports_for_share(study, share))  # type: ignore[attr-defined]
    return render(
        request,
        "transfers/patient_studies.html",
        {
            "share": share,
            "studies": studies,
            "forward_form": forward_form,
            "forwards": share.forwards.order_by("-created_at"),
        },
        status=status,
    )


class ForwardForm(forms.Form):
    email = forms.EmailField(label="Your doctor's e-mail address", max_length=254)
    days = forms.TypedChoiceField(label="For", coerce=int, choices=())

    def __init__(self, *args: object, share: Share, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        left = max((share.expires_at - timezone.now()).days, 1)
        options = [d for d in (7, 14, 30) if d < left] + [left]
        self.fields["days"].choices = [  # type: ignore[attr-defined]
            (
                d,
                f"{d} day{'s' if d != 1 else ''}"
                + (" (as long as your link)" if d == left else ""),
            )
            for d in options
        ]
        self.fields["days"].initial = options[0]


def _verified_patient_share(request: HttpRequest, token: str) -> Share | None:
    """The active patient link of this token, if this browser answered its second factor."""
    share = Share.objects.patient_link(token)
    if share is None or not patient_session_has(request=request, share=share):
        return None
    return share


@require_POST
@never_cache
def patient_forward(request: HttpRequest, token: str) -> HttpResponse:
    """The patient sends their study to a doctor by e-mail (a guest link, one e-mail)."""
    share = _verified_patient_share(request, token)
    if share is None:
        return _not_found(request)
    form = ForwardForm(request.POST, share=share)
    if form.is_valid():
        try:
            forward = share_forward(
                share=share,
                recipient_email=form.cleaned_data["email"],
                days=form.cleaned_data["days"],
                request=request,
            )
        except ShareError as exc:
            form.add_error("email", str(exc))
        else:
            messages.success(
                request,
                f"Sent to {forward.recipient_email}: they get one e-mail with a link, and open it "
                "with a code e-mailed to that address. You can stop sharing at any time below.",
            )
            return redirect("patient_studies", token=token)
    return _studies_page(request, share, form, status=400)


@require_POST
@never_cache
def patient_forward_revoke(request: HttpRequest, token: str, share_uuid: str) -> HttpResponse:
    """The patient stops a share they forwarded; another link's forwards answer 404."""
    share = _verified_patient_share(request, token)
    forward = share.forwards.filter(uuid=share_uuid).first() if share is not None else None
    if share is None or forward is None:
        return _not_found(request, "not a forward of this verified patient link")
    share_revoke(share=forward, by=None, request=request, who="patient link")
    messages.success(request, f"{forward.recipient_email} can no longer open your study.")
    return redirect("patient_studies", token=token)


@require_GET
@never_cache
def patient_summary(request: HttpRequest, token: str, study_uuid: str) -> HttpResponse:
    """A printable one-page summary of one study for the patient: what it is, when and where it
    was made, its series, the reports marked for them, and how to reach the sending facility."""
    access = study_access(request, study_uuid, token=token)
    study = access.study
    audit_record(
        action=AuditAction.STUDY_VIEW,
        request=request,
        study=study,
        detail={"share": str(access.share.uuid) if access.share else None, "page": "summary"},
    )
    return render(
        request,
        "transfers/patient_summary.html",
        {
            "share": access.share,
            "study": study,
            "series": study.series.order_by("series_number", "id"),
            "reports": reports_visible(access),
            "token": token,
        },
    )


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


@require_POST
@login_required
def patient_link_unlock_view(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    """The sender lifts the lock: the patient may answer again, with the same link."""
    share = _get_handout_share_for_user(request, share_uuid, "unlock")
    try:
        patient_link_unlock(share=share, by=request.user, request=request)
    except ShareError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "The patient link is unlocked; the patient can answer again.")
    return redirect("share_detail", share_uuid=share.uuid)


@require_POST
@login_required
def patient_link_reissue_view(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    """The sender replaces the link (and PIN): the old one stops working; the new one is shown
    once on the handout page, like at creation. It is not e-mailed: the old link may have
    leaked through that very mailbox."""
    share = _get_handout_share_for_user(request, share_uuid, "reissue")
    try:
        raw_token, pin = patient_link_reissue(share=share, by=request.user, request=request)
    except ShareError as exc:
        messages.error(request, str(exc))
        return redirect("share_detail", share_uuid=share.uuid)
    request.session[f"patient_link_{share.uuid}"] = raw_token
    if pin:
        request.session[f"patient_pin_{share.uuid}"] = pin
    return redirect("patient_handout", share_uuid=share.uuid)
