"""Account and facility workflows: invitations, memberships, API tokens."""

from __future__ import annotations

import secrets
from typing import Any

from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from .audit import audit_record
from .emails import email_queue
from .models import (
    ApiToken,
    AuditAction,
    Facility,
    Invitation,
    Membership,
    TokenAccess,
    User,
    hash_token,
)


class ServiceError(Exception):
    """A refusal to show the person who asked."""


def invitation_create(
    *,
    facility: Facility,
    email: str,
    role: str,
    invited_by: User,
    request: HttpRequest | None = None,
    email_template: str = "invitation",
    extra_context: dict[str, Any] | None = None,
) -> Invitation:
    invitation, _ = _invitation_make(
        facility=facility,
        email=email,
        role=role,
        invited_by=invited_by,
        request=request,
        email_template=email_template,
        extra_context=extra_context,
    )
    return invitation


def invitation_create_unsent(
    *, facility: Facility, email: str, role: str, invited_by: User, request: HttpRequest | None
) -> str:
    """An invitation for someone who proved the address in this very browser (a guest who
    entered the code e-mailed there): no e-mail, the raw token goes straight to its page."""
    _, raw = _invitation_make(
        facility=facility,
        email=email,
        role=role,
        invited_by=invited_by,
        request=request,
        email_template=None,
    )
    return raw


def _invitation_make(
    *,
    facility: Facility,
    email: str,
    role: str,
    invited_by: User,
    request: HttpRequest | None,
    email_template: str | None,
    extra_context: dict[str, Any] | None = None,
) -> tuple[Invitation, str]:
    email = email.strip().lower()
    if Membership.objects.filter(facility=facility, user__email__iexact=email).exists():
        raise ServiceError(f"{email} is already a member of {facility.name}.")
    raw = Invitation.new_token()
    with transaction.atomic():
        # A new invitation replaces any earlier one still open for the same address.
        Invitation.objects.filter(
            facility=facility,
            email__iexact=email,
            accepted_at__isnull=True,
            revoked_at__isnull=True,
        ).update(revoked_at=timezone.now())
        invitation = Invitation.objects.create(
            facility=facility,
            email=email,
            role=role,
            token_hash=hash_token(raw),
            invited_by=invited_by,
            expires_at=Invitation.default_expiry(),
        )
        audit_record(
            action=AuditAction.MEMBER_INVITE,
            request=request,
            actor=invited_by,
            facility=facility,
            detail={"email": email, "role": role},
        )
        if email_template is not None:
            email_queue(
                name=email_template,
                to=email,
                context={
                    **(extra_context or {}),
                    "invitation": invitation,
                    "facility": facility,
                    "inviter": invited_by,
                    "token": raw,
                },
            )
    return invitation, raw


def practice_create(*, email: str) -> Facility:
    """A personal practice for a physician who receives a share before having an account."""
    return Facility.objects.create(
        name=f"Practice of {email}",
        slug=f"practice-{secrets.token_hex(6)}",
        city="",
        is_practice=True,
    )


def invitation_for_token(raw: str) -> Invitation | None:
    invitation = (
        Invitation.objects.select_related("facility").filter(token_hash=hash_token(raw)).first()
    )
    return invitation if invitation is not None and invitation.is_usable else None


def invitation_accept(
    *, raw_token: str, user: User, request: HttpRequest | None = None
) -> Membership:
    with transaction.atomic():
        invitation = (
            Invitation.objects.select_for_update().filter(token_hash=hash_token(raw_token)).first()
        )
        if invitation is None or not invitation.is_usable:
            raise ServiceError("This invitation link is no longer valid. Ask for a new one.")
        if user.email.lower() != invitation.email.lower():
            raise ServiceError(
                f"This invitation is for {invitation.email}; sign in with that address."
            )
        membership, created = Membership.objects.get_or_create(
            user=user, facility=invitation.facility, defaults={"role": invitation.role}
        )
        invitation.accepted_at = timezone.now()
        invitation.accepted_by = user
        invitation.save(update_fields=["accepted_at", "accepted_by"])
        audit_record(
            action=AuditAction.MEMBER_JOIN,
            request=request,
            actor=user,
            facility=invitation.facility,
            detail={"role": membership.role, "new": created},
        )
    return membership


def invitation_withdraw(
    *, facility: Facility, invitation_id: int, by: User, request: HttpRequest | None = None
) -> bool:
    """Withdraw an invitation of the facility not yet accepted; False when there is none."""
    with transaction.atomic():
        invitation = (
            Invitation.objects.select_for_update()
            .filter(
                pk=invitation_id,
                facility=facility,
                accepted_at__isnull=True,
                revoked_at__isnull=True,
            )
            .first()
        )
        if invitation is None:
            return False
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        audit_record(
            action=AuditAction.INVITATION_REVOKE,
            request=request,
            actor=by,
            facility=facility,
            detail={"email": invitation.email, "role": invitation.role},
        )
    return True


def facility_listing_set(
    *, facility: Facility, listed: bool, by: User, request: HttpRequest | None = None
) -> None:
    """List the facility in the directory other facilities share from, or take it out. A
    physician's own practice is never listed."""
    if listed and facility.is_practice:
        raise ServiceError("A physician's practice is not listed in the directory.")
    _facility_flag_set(facility, "listed", listed, by=by, request=request)


def facility_require_mfa_set(
    *, facility: Facility, required: bool, by: User, request: HttpRequest | None = None
) -> None:
    """Ask a second factor of every member (admins always need one)."""
    _facility_flag_set(facility, "require_mfa", required, by=by, request=request)


def _facility_flag_set(
    facility: Facility, field: str, value: bool, *, by: User, request: HttpRequest | None
) -> None:
    """Set one yes/no setting of the facility under its row lock; audited with before and
    after, and nothing written when it already had that value."""
    with transaction.atomic():
        locked = Facility.objects.select_for_update().get(pk=facility.pk)
        if getattr(locked, field) == value:
            return
        setattr(locked, field, value)
        setattr(facility, field, value)
        locked.save(update_fields=[field])
        audit_record(
            action=AuditAction.FACILITY_CHANGE,
            request=request,
            actor=by,
            facility=facility,
            detail={"before": {field: not value}, "after": {field: value}},
        )


def membership_change_role(
    *, membership: Membership, role: str, by: User, request: HttpRequest | None = None
) -> None:
    with transaction.atomic():
        locked = Membership.objects.select_for_update().get(pk=membership.pk)
        if locked.role == "admin" and role != "admin" and _last_admin(locked):
            raise ServiceError("A facility keeps at least one admin.")
        old = locked.role
        locked.role = role
        locked.save(update_fields=["role"])
        audit_record(
            action=AuditAction.MEMBER_CHANGE,
            request=request,
            actor=by,
            facility=locked.facility,
            detail={"member": locked.user.email, "from": old, "to": role},
        )


def membership_remove(
    *, membership: Membership, by: User, request: HttpRequest | None = None
) -> None:
    with transaction.atomic():
        locked = Membership.objects.select_for_update().get(pk=membership.pk)
        if locked.role == "admin" and _last_admin(locked):
            raise ServiceError("A facility keeps at least one admin.")
        audit_record(
            action=AuditAction.MEMBER_REMOVE,
            request=request,
            actor=by,
            facility=locked.facility,
            detail={"member": locked.user.email, "role": locked.role},
        )
        locked.delete()


def _last_admin(membership: Membership) -> bool:
    return (
        not Membership.objects.filter(facility=membership.facility, role="admin")
        .exclude(pk=membership.pk)
        .exists()
    )


def api_token_create(
    *,
    user: User,
    name: str,
    facility: Facility,
    access: str = TokenAccess.WRITE,
    days: int = 90,
    request: HttpRequest | None = None,
) -> tuple[ApiToken, str]:
    """A token for one facility the person belongs to; an uploading one needs a sender role
    there. It lives at most a year."""
    membership = Membership.objects.filter(user=user, facility=facility).first()
    if membership is None:
        raise ServiceError("You are not a member of that facility.")
    if access == TokenAccess.WRITE and not membership.can_upload:
        raise ServiceError(f"You cannot upload to {facility.name}; make a read token.")
    if days not in ApiToken.LIFETIMES_DAYS:
        raise ServiceError("Choose how long the token lives.")
    with transaction.atomic():
        token, raw = ApiToken.issue(
            user=user, name=name, facility=facility, access=access, days=days
        )
        audit_record(
            action=AuditAction.TOKEN_CREATE,
            request=request,
            actor=user,
            facility=facility,
            detail={"token": token.hint, "name": name, "access": access, "days": days},
        )
    return token, raw


def api_token_revoke(*, token: ApiToken, request: HttpRequest | None = None) -> None:
    with transaction.atomic():
        updated = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        if updated:
            audit_record(
                action=AuditAction.TOKEN_REVOKE,
                request=request,
                actor=token.user,
                detail={"token": token.hint},
            )
