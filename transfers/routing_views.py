"""The facility admin's DICOM page: who may send to the gateway, routing rules, PACS destinations."""

from __future__ import annotations

from uuid import UUID

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.db.models import ProtectedError
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from portal.access import AuthedRequest, get_membership_for_user
from portal.models import Facility, ae_title_validator

from .models import PacsDestination, RoutingRule
from .pacs import destination_echo


class GatewayForm(forms.ModelForm):
    class Meta:
        model = Facility
        fields = ["gateway_calling_aes", "gateway_addresses"]
        widgets = {
            "gateway_calling_aes": forms.TextInput(
                attrs={"placeholder": "any, or e.g. PACS1 PACS2"}
            ),
            "gateway_addresses": forms.TextInput(
                attrs={"placeholder": "any, or e.g. 10.1.2.3 10.20.0.0/16"}
            ),
        }


class DestinationForm(forms.ModelForm):
    class Meta:
        model = PacsDestination
        fields = ["name", "ae_title", "host", "port"]

    def clean_ae_title(self) -> str:
        value = self.cleaned_data["ae_title"].strip()
        ae_title_validator(value)
        return value

    def clean_port(self) -> int:
        port = self.cleaned_data["port"]
        if not 1 <= port <= 65535:
            raise forms.ValidationError("A port is 1 to 65535.")
        return int(port)


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
        self.fields["recipient_facility"].queryset = Facility.objects.exclude(pk=facility.pk)  # type: ignore[attr-defined]

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        if bool(data.get("recipient_facility")) == bool(data.get("recipient_email")):
            raise forms.ValidationError("Choose one recipient: a facility or an e-mail address.")
        return data


def _uuid(value: str | None) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        return UUID(int=0)


@require_http_methods(["GET", "POST"])
@login_required
def routing_rules(request: AuthedRequest, slug: str) -> HttpResponse:
    facility = get_membership_for_user(request, slug, manage=True).facility
    gateway_form = GatewayForm(instance=facility)
    rule_form = RuleForm(facility=facility)
    destination_form = DestinationForm()
    which = request.POST.get("form") if request.method == "POST" else None
    if which in ("echo", "destination_delete"):
        destination = facility.destinations.filter(
            uuid=_uuid(request.POST.get("destination"))
        ).first()  # type: ignore[attr-defined]
        if destination is None:
            raise Http404("No such destination.")
        if which == "echo":
            result = destination_echo(destination=destination)
            (messages.success if result.ok else messages.error)(
                request, f"{destination.name}: {result.message}"
            )
        else:
            try:
                destination.delete()
            except ProtectedError:
                messages.error(request, f"{destination.name} has pushes on record; it stays.")
            else:
                messages.success(request, f"{destination.name} removed.")
        return redirect("routing_rules", slug=slug)
    if which == "destination":
        destination_form = DestinationForm(request.POST)
        if destination_form.is_valid():
            destination_form.instance.facility = facility
            destination_form.save()
            messages.success(request, "PACS destination added.")
            return redirect("routing_rules", slug=slug)
    elif which == "gateway":
        gateway_form = GatewayForm(request.POST, instance=facility)
        if gateway_form.is_valid():
            gateway_form.save()
            messages.success(request, "Gateway access saved.")
            return redirect("routing_rules", slug=slug)
    elif which == "rule":
        rule_form = RuleForm(request.POST, facility=facility)
        if rule_form.is_valid():
            data = rule_form.cleaned_data
            RoutingRule.objects.create(
                facility=facility,
                created_by=request.user,
                calling_ae=data["calling_ae"].strip(),
                referring_physician=data["referring_physician"].strip(),
                modality=data["modality"].strip().upper(),
                recipient_facility=data["recipient_facility"],
                recipient_email=data["recipient_email"],
                can_download=data["can_download"],
                can_import=data["can_import"],
            )
            messages.success(request, "Routing rule added.")
            return redirect("routing_rules", slug=slug)
    rules = facility.routing_rules.select_related("recipient_facility", "created_by")  # type: ignore[attr-defined]
    return render(
        request,
        "transfers/routing_rules.html",
        {
            "facility": facility,
            "gateway_form": gateway_form,
            "rule_form": rule_form,
            "rules": rules,
            "destination_form": destination_form,
            "destinations": facility.destinations.all(),  # type: ignore[attr-defined]
            "gateway_port": settings.DICOM_GATEWAY_PORT,
        },
    )


@require_POST
@login_required
def routing_rule_delete(request: AuthedRequest, slug: str, rule_uuid: str) -> HttpResponse:
    facility = get_membership_for_user(request, slug, manage=True).facility
    with transaction.atomic():
        deleted, _ = RoutingRule.objects.filter(facility=facility, uuid=rule_uuid).delete()
    if not deleted:
        raise Http404("No such rule.")
    messages.success(request, "Routing rule removed; shares it made stay until they expire.")
    return redirect("routing_rules", slug=slug)
