"""Django admin for staff. The audit trail is read-only here as everywhere."""

from __future__ import annotations

from typing import Any

from axes.models import AccessAttempt, AccessFailureLog
from django import forms
from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.http import HttpRequest

from .audit import audit_record
from .lockout import account_unlock
from .models import (
    ApiToken,
    AuditAction,
    AuditEvent,
    Facility,
    Invitation,
    Membership,
    Role,
    SingleSignOn,
    User,
)


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    ordering = ("email",)
    list_display = ("email", "full_name", "is_staff", "is_active", "last_login")
    search_fields = ("email", "full_name")
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Personal info", {"fields": ("full_name",)}),
        (
            "Permissions",
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "password1", "password2")}),)
    filter_horizontal = ("groups", "user_permissions")
    list_filter = ("is_staff", "is_active")
    actions = ("unlock_sign_in",)

    @admin.action(description="Lift the sign-in lockout of the selected people")
    def unlock_sign_in(self, request: HttpRequest, queryset: Any) -> None:
        for user in queryset:
            account_unlock(user=user, request=request)
        self.message_user(request, f"{queryset.count()} can sign in again.")


# django-axes' own admin lets staff delete attempts, which would lift a lockout unaudited: its
# list stays for reading, and the unlock is the audited action on people above.
for _model in (AccessAttempt, AccessFailureLog):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)


@admin.register(AccessAttempt)
class AccessAttemptAdmin(admin.ModelAdmin):
    list_display = ("attempt_time", "username", "ip_address", "failures_since_start")
    search_fields = ("username", "ip_address")
    readonly_fields = ("attempt_time", "username", "ip_address", "failures_since_start")
    exclude = ("get_data", "post_data", "user_agent", "http_accept", "path_info")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Facility)
class FacilityAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "city", "ae_title", "has_pacs", "listed", "is_practice")
    list_filter = ("listed", "is_practice")
    search_fields = ("name", "slug", "ae_title")
    prepopulated_fields = {"slug": ("name",)}
    inlines = (MembershipInline,)


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = (
        "email",
        "facility",
        "role",
        "created_at",
        "expires_at",
        "accepted_at",
        "revoked_at",
    )
    exclude = ("token_hash",)
    readonly_fields = ("accepted_at", "accepted_by")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "hint", "created_at", "last_used_at", "revoked_at")
    exclude = ("token_hash",)
    readonly_fields = ("user", "hint", "created_at", "last_used_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tokens are made on the profile page, where the raw value is shown once


class SingleSignOnForm(forms.ModelForm):
    class Meta:
        model = SingleSignOn
        fields = [
            "facility",
            "app",
            "email_domains",
            "role_claim",
            "role_map",
            "default_role",
            "enabled",
        ]

    def clean_app(self) -> object:
        app = self.cleaned_data["app"]
        if app is not None and app.provider != "openid_connect":
            raise forms.ValidationError("Choose an OpenID Connect provider (openid_connect).")
        return app

    def clean_email_domains(self) -> str:
        domains = [
            d.strip().lower().lstrip("@")
            for d in self.cleaned_data["email_domains"].split(",")
            if d.strip()
        ]
        if not domains or any("@" in d or "." not in d or " " in d for d in domains):
            raise forms.ValidationError("Give the facility's e-mail domains, e.g. krmc.example.")
        return ", ".join(domains)

    def clean_role_map(self) -> dict[str, str]:
        role_map = self.cleaned_data["role_map"] or {}
        roles = set(Role.values)
        if not isinstance(role_map, dict) or any(
            not isinstance(v, str) or v not in roles for v in role_map.values()
        ):
            raise forms.ValidationError(f"Map each claim value to one of: {', '.join(roles)}.")
        return role_map


def _sso_state(sso: SingleSignOn | None) -> dict[str, Any] | None:
    """What the trail keeps of a facility's SSO set-up: never the client secret."""
    if sso is None:
        return None
    return {
        "provider": sso.app.provider_id,
        "issuer": sso.app.settings.get("server_url", ""),
        "client_id": sso.app.client_id,
        "email_domains": sso.domains(),
        "role_claim": sso.role_claim,
        "role_map": sso.role_map,
        "default_role": sso.default_role,
        "enabled": sso.enabled,
    }


@admin.register(SingleSignOn)
class SingleSignOnAdmin(admin.ModelAdmin):
    """A facility's single sign-on, for the operator. The provider itself (issuer URL, client id
    and secret) is a "Social application" (allauth), chosen or added from the App field."""

    form = SingleSignOnForm
    list_display = ("facility", "app", "email_domains", "role_claim", "default_role", "enabled")
    list_filter = ("enabled",)
    search_fields = ("facility__name", "facility__slug", "email_domains")

    def save_model(self, request: HttpRequest, obj: SingleSignOn, form: Any, change: bool) -> None:
        before = _sso_state(SingleSignOn.objects.filter(pk=obj.pk).first()) if change else None
        super().save_model(request, obj, form, change)
        audit_record(
            action=AuditAction.SSO_CHANGE,
            request=request,
            facility=obj.facility,
            detail={"before": before, "after": _sso_state(obj)},
        )

    def delete_model(self, request: HttpRequest, obj: SingleSignOn) -> None:
        before = _sso_state(obj)
        facility = obj.facility
        super().delete_model(request, obj)
        audit_record(
            action=AuditAction.SSO_CHANGE,
            request=request,
            facility=facility,
            detail={"before": before, "after": None},
        )


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("at", "actor_email", "facility", "action", "outcome", "patient_id", "client_ip")
    list_filter = ("action", "outcome")
    search_fields = ("actor_email", "patient_id", "study_instance_uid")
    date_hierarchy = "at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
