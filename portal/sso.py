"""Single sign-on: a facility's own OpenID Connect provider (allauth's openid_connect provider).

The operator adds the provider (issuer URL, client id and secret) as an allauth SocialApp and a
SingleSignOn row that ties it to a facility with its e-mail domains. Someone who signs in there
with a *verified* address in one of those domains becomes (or stays) a member of that facility:
a role claim the facility mapped sets their role at each sign-in; without one, a new member gets
the facility's default role and an existing member keeps the role their admin gave them.
An address outside the domains, or not verified by the provider, is refused and audited.

One Relay account is one address: the provider's verified address must be the account's own
(User.email). allauth would also match an address merely *added* to another account on the
e-mail page, unverified, and sign the provider's person into that account; that is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from allauth.account.models import EmailAddress
from allauth.account.signals import user_logged_in
from allauth.core.exceptions import ImmediateHttpResponse
from allauth.socialaccount.providers.base import AuthProcess
from allauth.socialaccount.signals import pre_social_login
from django.db import transaction
from django.dispatch import receiver
from django.http import HttpRequest
from django.shortcuts import render

from .audit import audit_record
from .models import AuditAction, Membership, Outcome, Role, SingleSignOn, User

# Several mapped values: the one giving the most rights wins.
_ROLE_ORDER = (Role.ADMIN, Role.SENDER, Role.READER, Role.VIEWER)


def _picked_claims(sociallogin: Any) -> dict[str, Any]:
    """The claims allauth read the address from: userinfo when it was fetched, else the ID
    token (allauth's openid_connect provider does the same)."""
    data = sociallogin.account.extra_data or {}
    for part in ("userinfo", "id_token"):
        if isinstance(data.get(part), dict) and data[part]:
            return dict(data[part])
    return dict(data)


def _claims(sociallogin: Any) -> dict[str, Any]:
    """Every claim the provider sent (for the role and the name): some providers put a custom
    claim only in the ID token, others only in userinfo; userinfo wins where both have it."""
    data = sociallogin.account.extra_data or {}
    merged: dict[str, Any] = {}
    for part in ("id_token", "userinfo"):
        if isinstance(data.get(part), dict):
            merged.update(data[part])
    return merged or dict(data)


def _is_true(value: Any) -> bool:
    # Some providers send email_verified as the string "true"/"false": the string "false" is
    # truthy in Python, and allauth's EmailAddress(verified="false") would count as verified.
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


@dataclass(frozen=True)
class Verdict:
    """What single sign-on makes of one provider sign-in: the facility's entry, the verified
    address, and why it is refused ("" when it is not)."""

    sso: SingleSignOn | None
    email: str
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.sso is not None and not self.reason


def sso_verdict(sociallogin: Any) -> Verdict:
    picked = _picked_claims(sociallogin)
    email = str(picked.get("email") or "").strip().lower()[:254]
    app = getattr(sociallogin.provider, "app", None)
    sso = None
    if app is not None and app.pk is not None:
        sso = SingleSignOn.objects.filter(app=app).select_related("facility").first()
    if sso is None:
        return Verdict(None, email, "the provider is not set up for a facility")
    if not sso.enabled:
        return Verdict(sso, email, "single sign-on is switched off for the facility")
    if (sociallogin.state or {}).get("process") == AuthProcess.CONNECT:
        # Tying a provider identity to whoever is signed in would let it sign in as them later.
        return Verdict(sso, email, "linking a provider identity to a signed-in account")
    if not email:
        return Verdict(sso, email, "the provider sent no e-mail address")
    if not _is_true(picked.get("email_verified")):
        return Verdict(sso, email, "address not verified by the provider")
    if not sso.covers(email):
        return Verdict(sso, email, "address outside the facility's e-mail domains")
    user = sociallogin.user
    if user is not None and user.pk is not None and str(user.email).strip().lower() != email:
        return Verdict(sso, email, "address belongs to another Relay account")
    return Verdict(sso, email)


def sso_for_login(sociallogin: Any) -> SingleSignOn | None:
    """The facility's SSO entry this login came through, if the sign-in is accepted (the
    provider vouched for an address in one of its domains); otherwise None."""
    verdict = sso_verdict(sociallogin)
    return verdict.sso if verdict.accepted else None


def role_from_claims(sso: SingleSignOn, claims: dict[str, Any]) -> str | None:
    if not sso.role_claim:
        return None
    value = claims.get(sso.role_claim)
    values = value if isinstance(value, list) else [value]
    mapped = {sso.role_map.get(str(v)) for v in values if str(v) in sso.role_map}
    for role in _ROLE_ORDER:
        if role.value in mapped:
            return role.value
    return None


@receiver(pre_social_login)
def _check_sign_in(sender: Any, request: HttpRequest, sociallogin: Any, **kwargs: Any) -> None:
    verdict = sso_verdict(sociallogin)
    if not verdict.accepted:
        app = getattr(sociallogin.provider, "app", None)
        audit_record(
            action=AuditAction.LOGIN_FAILED,
            request=request,
            # To the facility, so that its admins see who was turned away at their provider.
            facility=verdict.sso.facility if verdict.sso else None,
            outcome=Outcome.FAILURE,
            detail={
                "email": verdict.email,
                "via": "sso",
                "provider": getattr(app, "provider_id", "") or "",
                "reason": verdict.reason,
            },
        )
        raise ImmediateHttpResponse(
            render(request, "portal/sso_refused.html", {"reason": verdict.reason}, status=403)
        )
    # allauth keeps the flag as the provider sent it ("true" as a string would not even save):
    # what counts is the check above.
    for address in sociallogin.email_addresses:
        address.verified = str(address.email).strip().lower() == verdict.email
    user = sociallogin.user
    if user is not None and user.pk is not None:
        # The account's own address (the invitation that made the account went there), now also
        # vouched for by the facility's provider. Recorded as verified so that allauth does not
        # take the account for one opened with somebody else's address and wipe its password.
        _address_verified(user, verdict.email)


def sso_error_record(request: HttpRequest, provider: Any, error: str | None) -> None:
    """Audit a provider sign-in that broke off before Relay learnt who it was: the provider
    would not give Relay the tokens (a wrong client secret), the ID token did not check out
    (issuer, audience, expiry), the state was not this browser's, or the provider denied it.
    Called from SocialAccountAdapter.on_authentication_error. Pressing Cancel at the provider
    is not a failure. The exception's text stays out: it can quote the provider's answer."""
    if error == "cancelled":
        return
    app = getattr(provider, "app", None)
    sso = None
    if app is not None and app.pk is not None:
        sso = SingleSignOn.objects.filter(app=app).select_related("facility").first()
    audit_record(
        action=AuditAction.LOGIN_FAILED,
        request=request,
        facility=sso.facility if sso else None,
        outcome=Outcome.FAILURE,
        detail={
            "email": "",
            "via": "sso",
            "provider": getattr(app, "provider_id", "") or "",
            "reason": f"the sign-in at the provider did not complete ({error or 'unknown'})",
        },
    )


def _address_verified(user: User, email: str) -> None:
    address = EmailAddress.objects.filter(user=user, email__iexact=email).first()
    if address is None:
        has_primary = EmailAddress.objects.filter(user=user, primary=True).exists()
        EmailAddress.objects.create(
            user=user, email=user.email, verified=True, primary=not has_primary
        )
    elif not address.verified:
        address.verified = True
        address.save(update_fields=["verified"])


@receiver(user_logged_in)
def _sync_membership(
    sender: Any, request: HttpRequest, user: User, sociallogin: Any = None, **kwargs: Any
) -> None:
    if sociallogin is None:
        return
    sso = sso_for_login(sociallogin)
    if sso is None:  # pre_social_login refused it already; nothing to do
        return
    claims = _claims(sociallogin)
    claimed = role_from_claims(sso, claims)
    provider = sso.app.provider_id
    with transaction.atomic():
        if not user.full_name and claims.get("name"):
            User.objects.filter(pk=user.pk).update(full_name=str(claims["name"])[:150])
        membership, created = Membership.objects.select_for_update().get_or_create(
            user=user, facility=sso.facility, defaults={"role": claimed or sso.default_role}
        )
        if created:
            audit_record(
                action=AuditAction.MEMBER_JOIN,
                request=request,
                actor=user,
                facility=sso.facility,
                detail={"via": "sso", "provider": provider, "role": membership.role},
            )
        elif claimed and membership.role != claimed:
            before = membership.role
            membership.role = claimed
            membership.save(update_fields=["role"])
            audit_record(
                action=AuditAction.MEMBER_CHANGE,
                request=request,
                actor=user,
                facility=sso.facility,
                detail={
                    "via": "sso",
                    "provider": provider,
                    "member": user.email,
                    "before": before,
                    "after": claimed,
                },
            )
