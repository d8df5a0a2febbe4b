"""Pages of guest links: a physician without an account opens the studies shared with them by
the link in their e-mail and a one-time code e-mailed to the same address.

Every way a link can be wrong (unknown, revoked, expired, a patient link) answers the same 404
page. Once the code is right, this browser session may open the share's studies through the
/p/<token>/ viewer, download and report addresses (transfers.access), until the session ends or
the share lapses; "Sign out" forgets it at once.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from portal.audit import audit_record
from portal.models import AuditAction, Outcome

from ..access import patient_session_has
from ..models import Share
from ..patient_links.blocked import address_blocked_response
from ..patient_links.services import (
    FactorResult,
    patient_factor_check,
    patient_link_lock,
    patient_session_grant,
    patient_studies_view,
)
from ..reports import reports_for_share
from .services import (
    CODE_DIGITS,
    CodeSend,
    GuestError,
    guest_account_invitation,
    guest_address_hint,
    guest_code_send,
)


class CodeForm(forms.Form):
    code = forms.CharField(
        label="Code from the e-mail",
        min_length=CODE_DIGITS,
        max_length=CODE_DIGITS + 4,
        widget=forms.TextInput(
            attrs={
                "inputmode": "numeric",
                "autocomplete": "one-time-code",
                "pattern": r"[0-9 ]*",
                "size": CODE_DIGITS + 2,
            }
        ),
    )

    def clean_code(self) -> str:
        code = "".join(self.cleaned_data["code"].split())
        if not (code.isdigit() and len(code) == CODE_DIGITS):
            raise forms.ValidationError(f"The code is {CODE_DIGITS} digits.")
        return code


def _not_found(
    request: HttpRequest, reason: str = "unknown, revoked or expired link"
) -> HttpResponse:
    """The one page for every bad link; the refusal is audited, without the token or path."""
    audit_record(
        action=AuditAction.ACCESS_DENIED,
        request=request,
        outcome=Outcome.FAILURE,
        detail={"reason": reason, "what": "guest link"},
    )
    return render(request, "transfers/patient_not_found.html", status=404)


@require_http_methods(["GET", "POST"])
@never_cache
def guest_open(request: HttpRequest, token: str) -> HttpResponse:
    share = Share.objects.guest_link(token)
    if share is None:
        return _not_found(request)
    if request.method == "GET" and patient_session_has(request=request, share=share):
        return redirect("guest_studies", token=token)

    form = CodeForm()
    sent: CodeSend | None = None
    result: FactorResult | None = None
    status = 200
    if request.method == "POST":
        blocked = address_blocked_response(request, share)
        if blocked is not None:
            return blocked
        if "send" in request.POST:
            sent = guest_code_send(share=share, request=request)
            if sent.sent:
                # POST-redirect-GET: a reload does not send another code.
                request.session[f"guest_code_sent_{share.pk}"] = True
                return redirect("guest_open", token=token)
            status = 429 if sent.refused in ("wait", "limit") else 403
        else:
            form = CodeForm(request.POST)
            if form.is_valid():
                result = patient_factor_check(
                    share=share, request=request, code=form.cleaned_data["code"]
                )
                if result.ok:
                    request.session.pop(f"guest_code_sent_{share.pk}", None)
                    patient_session_grant(request=request, share=share)
                    return redirect("guest_studies", token=token)
            status = 403 if result is not None else 400
    lock = result.lock if result is not None else patient_link_lock(share=share)
    return render(
        request,
        "transfers/guest_open.html",
        {
            "share": share,
            "form": form,
            "sent": sent,
            "result": result,
            "lock": lock,
            "address_hint": guest_address_hint(share.recipient_email),
            "code_sent": request.session.get(f"guest_code_sent_{share.pk}", False),
            "digits": CODE_DIGITS,
        },
        status=status,
    )


@require_http_methods(["GET"])
@never_cache
def guest_studies(request: HttpRequest, token: str) -> HttpResponse:
    # The share is looked up afresh on every page: revoked or expired stops a verified session.
    share = Share.objects.guest_link(token)
    if share is None:
        return _not_found(request)
    if not patient_session_has(request=request, share=share):
        return redirect("guest_open", token=token)
    patient_studies_view(share=share, request=request)
    studies = list(share.studies.filter(purged_at__isnull=True).order_by("-study_date", "id"))
    for study in studies:
        study.guest_reports = list(reports_for_share(study, share))  # type: ignore[attr-defined]
    return render(
        request,
        "transfers/guest_studies.html",
        {"share": share, "studies": studies, "token": token},
    )


@require_POST
def guest_sign_out(request: HttpRequest, token: str) -> HttpResponse:
    """Forget every link this browser session opened (a shared computer in a reading room)."""
    request.session.flush()
    return redirect("guest_open", token=token)


@require_POST
@never_cache
def guest_account(request: HttpRequest, token: str) -> HttpResponse:
    """Keep these studies in an account: for a guest whose session entered the code (so the
    address is theirs), straight to the account form, with no further e-mail."""
    share = Share.objects.guest_link(token)
    if share is None:
        return _not_found(request)
    if not patient_session_has(request=request, share=share):
        return redirect("guest_open", token=token)
    try:
        raw = guest_account_invitation(share=share, request=request)
    except GuestError as exc:
        messages.info(request, str(exc))
        return redirect("login")
    return redirect("invitation_open", token=raw)
