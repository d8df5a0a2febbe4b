"""DICOM pages: a study's "Send to PACS" (push to one of your facility's PACS, see and re-run
pushes), and the facility admin's DICOM page (gateway access, PACS destinations, routing rules),
whose every change is its own POST URL and its own audited service (transfers.dicom.config)."""

from __future__ import annotations

import ipaddress
import re
from uuid import UUID

from allauth.core.ratelimit import consume
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal.access import AuthedRequest, facilities_of, get_membership_for_user
from portal.audit import audit_record
from portal.models import AuditAction, Facility, Outcome, ae_title_validator
from portal.reauth import reauthentication_required

from ..access import study_access
from ..deliveries import receiving_facility_of
from ..models import PacsDestination, Push, PushStatus
from ..sharing.directory import facility_directory
from .config import (
    ConfigError,
    destination_add,
    destination_change,
    destination_remove,
    destination_test,
    gateway_access_change,
    routing_rule_add,
    routing_rule_remove,
)
from .push import PUSH_ATTEMPTS, PushError, push_cancel, push_create, push_rerun
from .tls import CertificateError, ca_certificates_check, fingerprints_parse


def _uuid(value: str | None) -> UUID:
    """A posted UUID; a malformed one matches nothing rather than raising."""
    try:
        return UUID(str(value))
    except ValueError:
        return UUID(int=0)


@require_http_methods(["GET", "POST"])
@login_required
def study_pacs(request: AuthedRequest, study_uuid: str) -> HttpResponse:
    access = study_access(request, study_uuid)
    destinations = PacsDestination.objects.filter(facility__in=facilities_of(request.user))
    pushes = (
        Push.objects.filter(study=access.study, destination__in=destinations)
        .select_related("destination", "requested_by")
        .prefetch_related("items__instance")
    )
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "push":
            destination = destinations.filter(uuid=_uuid(request.POST.get("destination"))).first()
            if destination is None:
                messages.error(request, "Choose one of your facility's PACS.")
            else:
                try:
                    push_create(
                        access=access, destination=destination, by=request.user, request=request
                    )
                except PushError as exc:
                    messages.error(request, str(exc))
                else:
                    messages.success(request, f"Sending to {destination.name}.")
        elif action == "rerun":
            push = pushes.filter(uuid=_uuid(request.POST.get("push"))).first()
            try:
                again = push is not None and push_rerun(
                    push=push, access=access, by=request.user, request=request
                )
            except PushError as exc:
                messages.error(request, str(exc))
            else:
                if again:
                    messages.success(request, "Sending again what did not arrive.")
                else:
                    messages.error(request, "Nothing to send again.")
        elif action == "cancel":
            push = pushes.filter(uuid=_uuid(request.POST.get("push"))).first()
            try:
                cancelled = push is not None and push_cancel(
                    push=push, by=request.user, request=request
                )
            except PushError as exc:
                audit_record(
                    action=AuditAction.ACCESS_DENIED,
                    request=request,
                    study=access.study,
                    outcome=Outcome.FAILURE,
                    detail={"reason": str(exc), "page": "pacs", "action": "cancel"},
                )
                messages.error(request, str(exc))
            else:
                if cancelled and push is not None:
                    messages.success(request, f"Cancelled sending to {push.destination.name}.")
                else:
                    messages.error(
                        request, "That push can no longer be cancelled: it is sending or has ended."
                    )
        return redirect("study_pacs", study_uuid=access.study.uuid)
    # Every look a person asks for is audited; the page's own reloads (?refresh=1, which it
    # adds while work is pending) once per ten minutes per session.
    first = _first_look(request, f"pacs:{access.study.uuid}")
    if first or request.GET.get("refresh") != "1":
        audit_record(
            action=AuditAction.STUDY_VIEW,
            request=request,
            study=access.study,
            actor_facility=receiving_facility_of(share=access.share, user=request.user),
            detail={"page": "pacs"},
        )
    pushes = pushes.all()
    return render(
        request,
        "transfers/study_pacs.html",
        {
            "study": access.study,
            "access": access,
            "destinations": destinations,
            "pushes": pushes,
            # The page reloads itself while anything is queued, sending or waiting to retry.
            "pending": any(p.is_pending for p in pushes),
            # Every 5 s while one is queued or sending; every 30 s while they only wait to retry.
            "refresh_seconds": 5
            if any(
                p.status in (PushStatus.QUEUED, PushStatus.RUNNING) and p.next_attempt_at is None
                for p in pushes
            )
            else 30,
            "attempts_max": PUSH_ATTEMPTS,
        },
    )


AUDIT_AGAIN_AFTER_S = 600


def _first_look(request: AuthedRequest, page: str) -> bool:
    """True unless this browser session opened the page in the last ten minutes: a page that
    refreshes itself every few seconds is audited as one look, not hundreds. Keyed by the
    session, not by anything in the address, so a person cannot opt out of the audit."""
    seen = request.session.get("audited_pages", {})
    now = int(timezone.now().timestamp())
    if now - int(seen.get(page, 0)) < AUDIT_AGAIN_AFTER_S:
        return False
    # Only pages seen recently are kept, so the session does not grow.
    seen = {key: at for key, at in seen.items() if now - int(at) < AUDIT_AGAIN_AFTER_S}
    seen[page] = now
    request.session["audited_pages"] = seen
    return True


# --- the facility admin's DICOM page ------------------------------------------------------------


class GatewayForm(forms.ModelForm):
    class Meta:
        model = Facility
        fields = [
            "gateway_calling_aes",
            "gateway_addresses",
            "gateway_client_certificates",
            "gateway_tls_required",
        ]
        widgets = {
            "gateway_calling_aes": forms.TextInput(attrs={"placeholder": "e.g. PACS1 PACS2"}),
            "gateway_addresses": forms.TextInput(
                attrs={"placeholder": "e.g. 10.1.2.3 10.20.0.0/16"}
            ),
            "gateway_client_certificates": forms.Textarea(
                attrs={
                    "rows": 3,
                    "placeholder": "PEM certificates or SHA-256 fingerprints, one per line",
                }
            ),
        }

    def clean_gateway_calling_aes(self) -> str:
        titles = _entries(self.cleaned_data["gateway_calling_aes"])
        for title in titles:
            try:
                ae_title_validator(title)
            except forms.ValidationError:
                raise forms.ValidationError(f"{title[:20]!r} is not an AE title.") from None
        return " ".join(titles)

    def clean_gateway_addresses(self) -> str:
        entries = _entries(self.cleaned_data["gateway_addresses"])
        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise forms.ValidationError(
                    f"{entry[:45]!r} is not an IP address or network."
                ) from None
        return " ".join(entries)

    def clean_gateway_client_certificates(self) -> str:
        try:
            return "\n".join(fingerprints_parse(self.cleaned_data["gateway_client_certificates"]))
        except CertificateError as exc:
            raise forms.ValidationError(str(exc)) from None


def _entries(text: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", text.strip()) if item]


class DestinationForm(forms.ModelForm):
    class Meta:
        model = PacsDestination
        fields = ["name", "ae_title", "host", "port", "tls", "tls_ca_certificates"]
        widgets = {
            "tls_ca_certificates": forms.Textarea(
                attrs={"rows": 3, "placeholder": "blank: the system's trusted CAs"}
            )
        }

    def clean_ae_title(self) -> str:
        value = self.cleaned_data["ae_title"].strip()
        ae_title_validator(value)
        return value

    def clean_port(self) -> int:
        port = self.cleaned_data["port"]
        if not 1 <= port <= 65535:
            raise forms.ValidationError("A port is 1 to 65535.")
        return int(port)

    def clean_tls_ca_certificates(self) -> str:
        try:
            return ca_certificates_check(self.cleaned_data["tls_ca_certificates"])
        except CertificateError as exc:
            raise forms.ValidationError(str(exc)) from None


class RuleForm(forms.Form):
    calling_ae = forms.CharField(label="From calling AE title", max_length=16, required=False)
    referring_physician = forms.CharField(
        label="Referring physician contains", max_length=64, required=False
    )
    modality = forms.CharField(max_length=16, required=False)
    recipient_facility = forms.ModelChoiceField(
        queryset=Facility.objects.none(), required=False, label="Share with facility"
    )
    recipient_email = forms.EmailField(required=False, label="or with a physician (e-mail)")
    can_download = forms.BooleanField(required=False, initial=True, label="may download")
    can_import = forms.BooleanField(required=False, initial=True, label="may import to PACS")

    def __init__(self, *args: object, facility: Facility, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fields["recipient_facility"].queryset = facility_directory(for_facility=facility)  # type: ignore[attr-defined]

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        if bool(data.get("recipient_facility")) == bool(data.get("recipient_email")):
            raise forms.ValidationError("Choose one recipient: a facility or an e-mail address.")
        return data


def _admin_facility(request: AuthedRequest, slug: str) -> Facility:
    """The facility whose DICOM settings this admin manages; 404 to anyone else."""
    return get_membership_for_user(request, slug, manage=True).facility


def _dicom_page(
    request: AuthedRequest,
    facility: Facility,
    *,
    gateway_form: GatewayForm | None = None,
    destination_form: DestinationForm | None = None,
    rule_form: RuleForm | None = None,
) -> HttpResponse:
    """The page, with whichever form was just posted shown again with its errors."""
    return render(
        request,
        "transfers/routing_rules.html",
        {
            "facility": facility,
            "gateway_form": gateway_form or GatewayForm(instance=facility),
            "destination_form": destination_form or DestinationForm(),
            "rule_form": rule_form or RuleForm(facility=facility),
            "rules": facility.routing_rules.select_related("recipient_facility", "created_by"),  # type: ignore[attr-defined]
            "destinations": facility.destinations.all(),  # type: ignore[attr-defined]
            "gateway_port": settings.DICOM_GATEWAY_PORT,
            "gateway_tls_port": settings.DICOM_GATEWAY_TLS_PORT
            if settings.DICOM_TLS_CERTIFICATE
            else None,
        },
    )


@require_GET
@login_required
def routing_rules(request: AuthedRequest, slug: str) -> HttpResponse:
    return _dicom_page(request, _admin_facility(request, slug))


@require_POST
@login_required
@reauthentication_required
def gateway_access_save(request: AuthedRequest, slug: str) -> HttpResponse:
    facility = _admin_facility(request, slug)
    # Bound to a copy: a form that fails validation must not leave its values on the page's
    # facility.
    form = GatewayForm(request.POST, instance=Facility.objects.get(pk=facility.pk))
    if not form.is_valid():
        return _dicom_page(request, facility, gateway_form=form)
    gateway_access_change(
        facility=facility,
        by=request.user,
        calling_aes=form.cleaned_data["gateway_calling_aes"],
        addresses=form.cleaned_data["gateway_addresses"],
        client_certificates=form.cleaned_data["gateway_client_certificates"],
        tls_required=form.cleaned_data["gateway_tls_required"],
        request=request,
    )
    messages.success(request, "Gateway access saved.")
    return redirect("routing_rules", slug=slug)


@require_POST
@login_required
@reauthentication_required
def destination_new(request: AuthedRequest, slug: str) -> HttpResponse:
    facility = _admin_facility(request, slug)
    form = DestinationForm(request.POST)
    if not form.is_valid():
        return _dicom_page(request, facility, destination_form=form)
    try:
        destination_add(facility=facility, by=request.user, request=request, **form.cleaned_data)
    except ConfigError as exc:
        form.add_error("host", str(exc))
        return _dicom_page(request, facility, destination_form=form)
    messages.success(request, "PACS destination added.")
    return redirect("routing_rules", slug=slug)


def _get_destination(facility: Facility, destination_uuid: str) -> PacsDestination:
    destination = facility.destinations.filter(uuid=destination_uuid).first()  # type: ignore[attr-defined]
    if destination is None:
        raise Http404("No such destination.")
    return destination  # type: ignore[no-any-return]


@require_POST
@login_required
def destination_echo_view(request: AuthedRequest, slug: str, destination_uuid: str) -> HttpResponse:
    destination = _get_destination(_admin_facility(request, slug), destination_uuid)
    # A few tests a minute per person: the button makes the server open connections.
    if not consume(request, action="destination_echo", user=request.user):
        messages.error(request, "Too many connection tests; wait a minute.")
        return redirect("routing_rules", slug=slug)
    result = destination_test(destination=destination, by=request.user, request=request)
    (messages.success if result.ok else messages.error)(
        request, f"{destination.name}: {result.message}"
    )
    return redirect("routing_rules", slug=slug)


@require_http_methods(["GET", "POST"])
@login_required
@reauthentication_required(allow_get=True)
def destination_edit(request: AuthedRequest, slug: str, destination_uuid: str) -> HttpResponse:
    """Change a destination: the form on GET, the change (audited, password asked again) on
    POST."""
    facility = _admin_facility(request, slug)
    destination = _get_destination(facility, destination_uuid)
    # Bound to a copy, so that a refused form leaves the destination as it was.
    form = DestinationForm(
        request.POST if request.method == "POST" else None,
        instance=PacsDestination.objects.get(pk=destination.pk),
    )
    if request.method == "POST" and form.is_valid():
        try:
            changed = destination_change(
                destination=destination, by=request.user, request=request, **form.cleaned_data
            )
        except ConfigError as exc:
            form.add_error("host", str(exc))
        else:
            messages.success(
                request, f"{destination.name} saved." if changed else "Nothing was changed."
            )
            return redirect("routing_rules", slug=slug)
    return render(
        request,
        "transfers/destination_edit.html",
        {"facility": facility, "destination": destination, "form": form},
    )


@require_POST
@login_required
@reauthentication_required
def destination_delete(request: AuthedRequest, slug: str, destination_uuid: str) -> HttpResponse:
    destination = _get_destination(_admin_facility(request, slug), destination_uuid)
    try:
        destination_remove(destination=destination, by=request.user, request=request)
    except ConfigError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{destination.name} removed.")
    return redirect("routing_rules", slug=slug)


@require_POST
@login_required
@reauthentication_required
def routing_rule_new(request: AuthedRequest, slug: str) -> HttpResponse:
    facility = _admin_facility(request, slug)
    form = RuleForm(request.POST, facility=facility)
    if not form.is_valid():
        return _dicom_page(request, facility, rule_form=form)
    routing_rule_add(facility=facility, by=request.user, request=request, **form.cleaned_data)
    messages.success(request, "Routing rule added.")
    return redirect("routing_rules", slug=slug)


@require_POST
@login_required
@reauthentication_required
def routing_rule_delete(request: AuthedRequest, slug: str, rule_uuid: str) -> HttpResponse:
    facility = _admin_facility(request, slug)
    if not routing_rule_remove(
        facility=facility, rule_uuid=rule_uuid, by=request.user, request=request
    ):
        raise Http404("No such rule.")
    messages.success(request, "Routing rule removed; shares it made stay until they expire.")
    return redirect("routing_rules", slug=slug)
