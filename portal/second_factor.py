"""Who must use a second factor, and the middleware that holds them to it.

Staff (the operator, who can read every facility's patients) and facility admins always need
one (not the invited physician who is the admin of their own one-person practice); so does every
member of a facility whose admin asks for it. Until such a person has a second
factor and has used it to sign in, every page but the second-factor pages and Sign out sends
them there (API-style requests get a 403): no PHI page answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from allauth.account.internal.flows.login import (
    get_authentication_records,
    record_authentication,
)
from allauth.account.signals import authentication_step_completed
from allauth.core import context
from allauth.mfa.base.forms import AuthenticateForm
from allauth.mfa.models import Authenticator
from allauth.mfa.signals import authentication_failed, authenticator_added, authenticator_removed
from allauth.mfa.webauthn.forms import AuthenticateWebAuthnForm
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Q
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect

from .access import home_facility
from .audit import audit_record
from .lockout import account_failure, account_locked
from .models import AuditAction, Membership, Outcome, Role, User

# Where someone who still owes a second factor may go.
_OPEN_PREFIXES = (
    "/accounts/2fa/",
    "/accounts/logout/",
    "/accounts/login/",
    "/accounts/reauthenticate/",
    "/accounts/session/",
    "/favicon.ico",
    "/static/",
)
_RECHECK_SECONDS = 60
_SESSION_KEY = "relay_mfa_required"


def mfa_required(user: User) -> bool:
    if user.is_staff or user.is_superuser:
        return True
    return (
        Membership.objects.filter(user=user)
        # A physician's own practice has one person in it: being its admin manages nobody else.
        .filter(Q(role=Role.ADMIN, facility__is_practice=False) | Q(facility__require_mfa=True))
        .exists()
    )


def _required_cached(request: HttpRequest, user: User) -> bool:
    """mfa_required, asked again at most once a minute per session (a role change takes effect
    within a minute without a query on every request)."""
    cached = request.session.get(_SESSION_KEY)
    now = time.time()
    if isinstance(cached, list) and len(cached) == 2 and now - cached[1] < _RECHECK_SECONDS:
        return bool(cached[0])
    required = mfa_required(user)
    request.session[_SESSION_KEY] = [required, now]
    return required


def signed_in_with_second_factor(request: HttpRequest, user: User) -> bool:
    return any(r.get("method") == "mfa" for r in get_authentication_records(request, user))


class SecondFactorRequiredMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = getattr(request, "user", None)
        if (
            user is not None
            and user.is_authenticated
            and not request.path.startswith(_OPEN_PREFIXES)
            and _required_cached(request, user)  # type: ignore[arg-type]
            and not signed_in_with_second_factor(request, user)  # type: ignore[arg-type]
        ):
            return self._refuse(request, user)  # type: ignore[arg-type]
        return self.get_response(request)

    def _refuse(self, request: HttpRequest, user: User) -> HttpResponse:
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            actor=user,
            facility=home_facility(user),
            outcome=Outcome.FAILURE,
            # Never the path: a path can hold a link's token.
            detail={"reason": "second factor required", "method": request.method or ""},
        )
        has_one = (
            Authenticator.objects.filter(user=user)
            .exclude(type=Authenticator.Type.RECOVERY_CODES)
            .exists()
        )
        wants_json = request.path.startswith("/api/") or "application/json" in request.headers.get(
            "Accept", ""
        )
        reason = (
            "Sign in again with your second factor."
            if has_one
            else "Your account needs a second factor (an authenticator app or a security key)."
        )
        if wants_json or request.method != "GET":
            return JsonResponse({"status": "error", "reason": reason}, status=403)
        messages.warning(request, reason)
        if has_one:
            # Signed in some other way (an old session): the sign-in with the factor again.
            from django.contrib.auth import logout

            logout(request)
            return redirect("login")
        return redirect("mfa_index")


# --- the audit trail of second factors and re-authentication ------------------------------------


def _audit(
    action: str,
    request: HttpRequest,
    user: User,
    detail: dict[str, Any],
    outcome: str = Outcome.SUCCESS,
) -> None:
    """One event of a person's own sign-in security, for their home facility's admins."""
    audit_record(
        action=action,
        request=request,
        actor=user,
        facility=home_facility(user),
        outcome=outcome,
        detail=detail,
    )


@receiver(authenticator_added)
def _on_added(sender: Any, request: HttpRequest, user: User, authenticator: Any, **kw: Any) -> None:
    if authenticator.type != Authenticator.Type.RECOVERY_CODES:
        # Activating an app took one of its codes, adding a key a touch of it: the session has
        # used a second factor, and the person goes on without signing in again.
        record_authentication(request, user, "mfa", type=authenticator.type, id=authenticator.pk)
    _audit(AuditAction.MFA_ADD, request, user, {"type": authenticator.type})


@receiver(authenticator_removed)
def _on_removed(
    sender: Any, request: HttpRequest, user: User, authenticator: Any, **kw: Any
) -> None:
    _audit(AuditAction.MFA_REMOVE, request, user, {"type": authenticator.type})


@receiver(authentication_failed)
def _on_failed(
    sender: Any, request: HttpRequest, user: User, authenticator: Any, **kw: Any
) -> None:
    # A wrong code counts toward the account's lockout like a wrong password: with the password
    # known, the codes are the last door, and new addresses must not buy new guesses.
    account_failure(request, user.email)
    detail = {"type": authenticator.type, "reauthentication": bool(kw.get("reauthentication"))}
    _audit(AuditAction.MFA_FAILED, request, user, detail, Outcome.FAILURE)


@receiver(authentication_step_completed)
def _on_step(sender: Any, request: HttpRequest, user: User, method: str, **extra: Any) -> None:
    # Only re-authentication (password or second factor asked again before a sensitive change):
    # sign-ins are audited as logins.
    if extra.get("reauthenticated"):
        _audit(AuditAction.REAUTH, request, user, {"method": method})


_LOCKED = "This account is locked after too many wrong attempts."


class AuditedAuthenticateWebAuthnForm(AuthenticateWebAuthnForm):
    """allauth reports wrong codes only; a refused security key is audited, and counted toward
    the account's lockout, the same way."""

    def clean_credential(self) -> Any:
        if account_locked(context.request, self.user.email):
            raise ValidationError(_LOCKED)
        try:
            return super().clean_credential()
        except ValidationError:
            account_failure(context.request, self.user.email)
            detail = {"type": "webauthn", "reauthentication": False}
            _audit(AuditAction.MFA_FAILED, context.request, self.user, detail, Outcome.FAILURE)
            raise


class LockAwareAuthenticateForm(AuthenticateForm):
    """The code step refuses every code, the right one too, while the account is locked (wrong
    codes lock it as wrong passwords do)."""

    def clean_code(self) -> str:
        if account_locked(context.request, self.user.email):
            raise ValidationError(_LOCKED)
        return str(super().clean_code())
