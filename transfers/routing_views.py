"""The facility admin's DICOM page: who may send to the gateway, and the routing rules."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from portal.access import AuthedRequest, get_membership_for_user
from portal.models import Facility

from .models import RoutingRule


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


@require_http_methods(["GET", "POST"])
@login_required
def routing_rules(request: AuthedRequest, slug: str) -> HttpResponse:
    facility = get_membership_for_user(request, slug, manage=True).facility
    gateway_form = GatewayForm(instance=facility)
    rule_form = RuleForm(facility=facility)
    if request.method == "POST" and request.POST.get("form") == "gateway":
        gateway_form = GatewayForm(request.POST, instance=facility)
        if gateway_form.is_valid():
            gateway_form.save()
            messages.success(request, "Gateway access saved.")
            return redirect("routing_rules", slug=slug)
    elif request.method == "POST":
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
