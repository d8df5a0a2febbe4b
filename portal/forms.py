"""Forms for accounts and facility administration. They validate; they do not act."""

from __future__ import annotations

from datetime import date
from typing import Any

from django import forms
from django.contrib.auth import password_validation

from .access import facilities_of
from .models import ApiToken, AuditAction, Facility, Role, TokenAccess, User


class InviteForm(forms.Form):
    email = forms.EmailField(label="E-mail")
    role = forms.ChoiceField(choices=Role.choices, initial=Role.READER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class AcceptInvitationForm(forms.Form):
    """For someone who has no account yet: their name and a password."""

    full_name = forms.CharField(max_length=150, label="Your name")
    password1 = forms.CharField(
        label="Password", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )
    password2 = forms.CharField(
        label="Password again", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("password1") != data.get("password2"):
            raise forms.ValidationError("The two passwords differ.")
        if data.get("password1"):
            password_validation.validate_password(data["password1"])
        return data


class ApiTokenForm(forms.Form):
    name = forms.CharField(
        max_length=100, label="Name", help_text="Where it is used, e.g. 'CT workstation uploader'."
    )
    facility = forms.ModelChoiceField(
        queryset=Facility.objects.none(), label="Facility", empty_label=None
    )
    access = forms.ChoiceField(choices=TokenAccess.choices, initial=TokenAccess.WRITE)
    days = forms.TypedChoiceField(
        label="Expires after",
        coerce=int,
        choices=[(d, f"{d} days") for d in ApiToken.LIFETIMES_DAYS],
        initial=90,
    )

    def __init__(self, *args: Any, user: User, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One facility per token, one the person belongs to; uploading also needs a sender role
        # there (checked by the service).
        self.fields["facility"].queryset = facilities_of(user).order_by("name")  # type: ignore[attr-defined]


class FacilitySecurityForm(forms.ModelForm):
    class Meta:
        model = Facility
        fields = ("require_mfa",)


class FacilityHelpDeskForm(forms.ModelForm):
    class Meta:
        model = Facility
        fields = ("help_desk_phone",)
        widgets = {
            "help_desk_phone": forms.TextInput(
                attrs={"autocomplete": "tel", "placeholder": "e.g. +1 406 555 0142"}
            )
        }


class AuditFilterForm(forms.Form):
    action = forms.ChoiceField(choices=[("", "Any action"), *AuditAction.choices], required=False)
    outcome = forms.ChoiceField(
        choices=[("", "Any outcome"), ("success", "Success"), ("failure", "Failure")],
        required=False,
    )
    who = forms.CharField(required=False, max_length=254, label="User e-mail")
    patient_id = forms.CharField(required=False, max_length=64, label="Patient ID")
    study_uid = forms.CharField(required=False, max_length=64, label="Study UID")
    date_from = forms.DateField(
        required=False, label="From", widget=forms.DateInput(attrs={"type": "date"})
    )
    date_to = forms.DateField(
        required=False, label="To", widget=forms.DateInput(attrs={"type": "date"})
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for name in ("date_from", "date_to"):
            day = data.get(name)
            if day is not None and not (date(2000, 1, 1) <= day <= date(2999, 12, 31)):
                self.add_error(name, "Choose a date between 2000 and 2999.")
        return data
